"""The demo recipe's own pieces: stage 0's per-cell labels and tower pretraining, the one-shape QA round."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import minillava
from minillava.shapes.data import COLORS, SHAPES, SIZES, generate_dataset, sample_rng, sample_scene
from minillava.shapes.recipe import Arch, build_config, cell_labels, init_weights, pretrain_tower


def tiny_model(**vision) -> minillava.Llava:
    config = build_config(Arch(vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=1), 64)
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_heads=2, **vision))
    torch.manual_seed(0)
    return init_weights(minillava.Llava(config))


def test_cell_labels_name_each_shape_in_its_cell():
    for index in range(50):
        shapes = sample_scene(sample_rng(0, "train", index))
        labels = cell_labels(shapes)
        assert labels[:, 3].tolist() == list(range(9))
        occupied = {s.cell: s for s in shapes}
        for cell in range(9):
            kind, colour, size, _ = labels[cell].tolist()
            if cell in occupied:
                s = occupied[cell]
                assert (SHAPES[kind - 1], tuple(COLORS)[colour - 1], SIZES[size - 1]) == (s.kind, s.color, s.size)
            else:
                assert (kind, colour, size) == (0, 0, 0)


def test_pretrain_tower_trains_the_tower_only_and_is_deterministic():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pretrain_tower(model, steps=3, lr=1e-2, batch_size=4, log=lambda _: None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision.") for k in changed)
    again = tiny_model()
    pretrain_tower(again, steps=3, lr=1e-2, batch_size=4, log=lambda _: None)
    assert all(torch.equal(after[k], v) for k, v in again.state_dict().items())


def test_pretrain_tower_needs_one_token_per_cell():
    model = tiny_model(patch_size=12)  # a 6x6 grid: four tokens per cell
    with pytest.raises(ValueError, match="3x3 patch grid"):
        pretrain_tower(model, steps=1, lr=1e-3, batch_size=2, log=lambda _: None)


def test_one_shape_round_records(tmp_path):
    path = generate_dataset(tmp_path, 5, 0, "train", start=100, max_shapes=1, stem="easy")["qa"]
    assert path.name == "easy.json"
    records = json.loads(path.read_text())
    assert [r["id"] for r in records] == [f"train-{i:06d}" for i in range(100, 105)]
    for record in records:
        assert (tmp_path / record["image"]).is_file()
        answers = [t["value"] for t in record["conversations"][1::2]]
        assert "1" in answers  # every fact of a one-shape image is asked, the count among them
