"""The bundled demo model's recipe: data, tokenizer, a random tiny LLaVA, stages 0, 1 and 2, assets.

``python -m minillava.shapes.recipe`` (``make train-demo``) rebuilds ``src/minillava/assets/shapes/`` from
the seed alone. Every step is deterministic on one machine: the images and questions are pure functions
of (seed, split, index) (:mod:`minillava.shapes.data`), the tokenizer is trained single-threaded on
unshuffled text, the initial weights come from ``torch.manual_seed``, and training draws its sample order
from its own seeded generator in one process.

Stages 1 and 2 are LLaVA-1.5's recipe and run on minillava's own trainer (``minillava.train``) over
LLaVA-format JSON and PNG files: stage 1 (``pretrain``) trains only the projector on captions with the
``plain`` template; stage 2 (``finetune``) trains the projector and the decoder on multi-turn question
answering with the real ``vicuna_v1`` template, first on one-shape images, then on all. As in LLaVA the vision
tower stays frozen in both: LLaVA starts from a pretrained CLIP tower, and here stage 0 (:func:`pretrain_tower`,
under a minute) is that pretraining, with per-cell labels instead of CLIP's captions.

Run with the default two threads: floating-point sums, hence the weights, depend on the thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import minillava
from minillava.config import BUNDLED_MODEL, ImageConfig, LlavaConfig, TextConfig, VisionConfig
from minillava.image import pixel_values
from minillava.shapes.data import (
    COLORS,
    IMAGE_SIZE,
    QTYPES,
    SHAPES,
    SIZES,
    EvalQuestion,
    answers_match,
    generate_dataset,
    iter_questions,
    render_scene,
    sample_rng,
    sample_scene,
)
from minillava.shapes.tokenizer import dataset_texts, train_tokenizer

ASSET_DIR = BUNDLED_MODEL
SEED = 0
TOKENIZER_IMAGES = 4000  # text of this many train images is plenty for a 640-piece vocabulary
IMAGE_TOKEN_ID = 3  # the tokenizer's user-defined <image> piece (see minillava.shapes.tokenizer)
TEMPLATE = "vicuna_v1"
IMAGE_MEAN = (0.89, 0.89, 0.87)  # per channel over 500 train images
IMAGE_STD = (0.15, 0.16, 0.18)
MAX_NEW_TOKENS = 40  # the longest answer (a three-shape description) is about 30 tokens


@dataclass
class Arch:
    """The tiny model's shape."""

    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    patch_size: int = 24  # 9 image tokens, one per 24-px cell of the 3x3 grid: each shape lies in one token
    text_hidden: int = 192
    text_intermediate: int = 512
    text_layers: int = 4
    text_heads: int = 6
    text_kv_heads: int = 3


def build_config(arch: Arch, vocab_size: int) -> LlavaConfig:
    """The demo's :class:`LlavaConfig`: model shape plus what inference needs (images, template, generation)."""
    return LlavaConfig(
        vision=VisionConfig(
            hidden_size=arch.vision_hidden,
            intermediate_size=4 * arch.vision_hidden,
            num_layers=arch.vision_layers,
            num_heads=arch.vision_heads,
            image_size=IMAGE_SIZE,
            patch_size=arch.patch_size,
            hidden_act="quick_gelu",
        ),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=arch.text_hidden,
            intermediate_size=arch.text_intermediate,
            num_layers=arch.text_layers,
            num_heads=arch.text_heads,
            num_kv_heads=arch.text_kv_heads,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        projector_type="mlp2x_gelu",
        # The tower starts from nothing, so LLaVA's -2 (the penultimate layer of a trained CLIP) means little here.
        # The patch embeddings (hidden state 0) beside the last layer give the decoder a direct, linear view of
        # the pixels: with the last layer alone two runs learned to ignore the image (loss identical with the
        # images shuffled after 300 steps); with [0, -1] the image mattered from step ~60 on.
        vision_feature_layer=[0, -1],
        vision_feature_select_strategy="default",
        # The images are drawn at 72 px already: resize and crop are identities. Mean and std are the training
        # images' own (rounded): the light background maps to about 0 and the shapes stand out, where CLIP's or
        # 0.5/0.5 would make every patch mostly one large constant.
        image=ImageConfig(mode="crop", shortest_edge=IMAGE_SIZE, crop_size=IMAGE_SIZE, mean=IMAGE_MEAN, std=IMAGE_STD),
        chat_template=TEMPLATE,
        generation={"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0},
    )


def init_weights(model: minillava.Llava, std: float = 0.02) -> minillava.Llava:
    """CLIP/LLaMA-style initialisation (``initializer_range`` 0.02), in place of PyTorch's module defaults.

    PyTorch's ``nn.Embedding`` draws N(0, 1): the tower's position embedding then outweighs the pixels' content
    (mostly background) several times over, every image looks alike to the decoder, and a first run spent
    hundreds of steps answering from the question alone. With N(0, 0.02) the patch content dominates.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
    torch.nn.init.normal_(model.vision.embeddings.class_embedding, mean=0.0, std=std)
    return model


def build_initial(
    out_dir: Path, arch: Arch, args: argparse.Namespace, log: Callable[[str], None], seed: int = SEED
) -> Path:
    """Tokenizer (trained on the train split's text) + random model with the tower pretrained (stage 0), saved as
    a checkpoint dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = out_dir / "_tokenizer"
    train_tokenizer(dataset_texts(TOKENIZER_IMAGES, seed, IMAGE_SIZE), tok_dir)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model")).vocab_size()
    config = build_config(arch, vocab)
    torch.manual_seed(seed)
    model = init_weights(minillava.Llava(config))
    if args.stage0_steps:
        pretrain_tower(model, args.stage0_steps, args.stage0_lr, args.batch_size, log, seed)
    files = [tok_dir / n for n in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")]
    init_dir = out_dir / "init"
    minillava.save(model, init_dir, extra_files=files, force=True)
    shutil.rmtree(tok_dir)
    return init_dir


# --- stage 0: the tower's own pretraining ---------------------------------------------------------------------

TOWER_FIRST_INDEX = 1_000_000  # train-split images for stage 0 start here, clear of the QA and caption images


def cell_labels(shapes: list, cells: int = 9) -> torch.Tensor:
    """Per cell (row-major): ``[kind + 1, colour + 1, size + 1, cell]``, 0 meaning "no shape" for the first three."""
    labels = torch.zeros(cells, 4, dtype=torch.long)
    labels[:, 3] = torch.arange(cells)
    for shape in shapes:
        kind, colour, size = SHAPES.index(shape.kind), tuple(COLORS).index(shape.color), SIZES.index(shape.size)
        labels[shape.cell, :3] = torch.tensor([kind + 1, colour + 1, size + 1])
    return labels


def pretrain_tower(
    model: minillava.Llava, steps: int, lr: float, batch_size: int, log: Callable[[str], None], seed: int = SEED
) -> None:
    """Stage 0: train the vision tower alone to tell, per image token, the kind, colour and size of the shape in
    its cell (or that it is empty) and which cell it is. The heads are thrown away afterwards.

    LLaVA starts from a pretrained CLIP tower; this is the tiny tower's stand-in for that pretraining. Trained
    only through the decoder, a random tower learns colour quickly but shape kinds slowly, and the decoder
    meanwhile settles for answers from the question alone (colour and kind at chance after 400 steps); with
    600 steps of this (about a minute) the same run answered 54% overall after 500 steps, 92% on "bigger".
    """
    vision = model.config.vision
    grid = vision.image_size // vision.patch_size
    if grid != 3 or vision.image_size != IMAGE_SIZE:
        raise ValueError(
            f"stage 0 needs one image token per cell: a 3x3 patch grid over {IMAGE_SIZE} px, got {grid}x{grid}"
        )
    sizes = (len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1, grid * grid)
    torch.manual_seed(seed)
    head = torch.nn.Linear(vision.hidden_size, sum(sizes))
    params = [*model.vision.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 30)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        pixels, labels = [], []
        for j in range(batch_size):
            rng = sample_rng(seed, "train", TOWER_FIRST_INDEX + (step - 1) * batch_size + j)
            shapes = sample_scene(rng, IMAGE_SIZE)
            pixels.append(pixel_values(render_scene(shapes, rng, IMAGE_SIZE), model.config.image))
            labels.append(cell_labels(shapes, grid * grid))
        logits = head(model.vision(torch.stack(pixels), [-1])[:, 1:])  # drop the class token: one row per cell
        parts, target = logits.split(sizes, dim=-1), torch.stack(labels)
        loss = sum(
            torch.nn.functional.cross_entropy(part.flatten(0, 1), target[..., k].flatten())
            for k, part in enumerate(parts)
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            accuracy = [(part.argmax(-1) == target[..., k]).float().mean().item() for k, part in enumerate(parts)]
            kind, colour, size, cell = (f"{100 * a:.0f}%" for a in accuracy)
            log(
                f"stage 0 step {step}/{steps}: loss {loss.item():.3f}; per token kind {kind} colour {colour} "
                f"size {size} cell {cell}; {time.perf_counter() - t0:.0f}s"
            )


# --- evaluation --------------------------------------------------------------------------------------------------


def evaluate(
    model: minillava.Llava,
    processor,
    n_images: int,
    seed: int = SEED,
    batch_size: int = 64,
    start: int = 0,
) -> dict[str, tuple[int, int]]:
    """Greedy exact match on held-out questions: ``{qtype: (correct, total)}`` plus ``"all"``."""
    questions = list(iter_questions(n_images, seed, "heldout", IMAGE_SIZE, start=start))
    return score_questions(model, processor, questions, QTYPES, batch_size)


def score_questions(
    model: minillava.Llava, processor, questions: list[EvalQuestion], keys: Sequence[str], batch_size: int = 64
) -> dict[str, tuple[int, int]]:
    """Ask each question on its own (``<image>`` first, the model's chat template, greedy, batched with left
    padding): ``{key: (correct, total)}`` in the order of ``keys`` (each question's ``qtype``), plus ``"all"``."""
    from minillava.generate import generate

    scores = {k: [0, 0] for k in (*keys, "all")}
    model.eval()
    for i in range(0, len(questions), batch_size):
        chunk = questions[i : i + batch_size]
        prompts = [processor.format_chat([{"role": "user", "content": f"<image>\n{q.question}"}]) for q in chunk]
        enc = processor(prompts, [[q.image] for q in chunk], padding_side="left")
        with torch.no_grad():
            out = generate(
                model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], max_new_tokens=MAX_NEW_TOKENS
            )
        for q, row in zip(chunk, out, strict=True):
            ok = answers_match(processor.decode(row, skip_special_tokens=True), q.answer)
            for key in (q.qtype, "all"):
                scores[key][0] += ok
                scores[key][1] += 1
    return {k: (v[0], v[1]) for k, v in scores.items() if v[1]}


def format_scores(scores: dict[str, tuple[int, int]]) -> str:
    """A small per-question-type table."""
    width = max(10, *map(len, scores))
    lines = [f"{'qtype':<{width}} {'correct':>8} {'total':>6} {'accuracy':>9}"]
    for k, (c, n) in scores.items():
        lines.append(f"{k:<{width}} {c:>8} {n:>6} {100 * c / n:>8.1f}%")
    return "\n".join(lines)


def train_with_trainer(init: Path, work: Path, args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """All stages with minillava's own trainer (``minillava.train``) on LLaVA-format files; returns the model dir.

    Stage 1 (``pretrain``, template ``plain``) reads the caption file and trains the projector. Stage 2
    (``finetune``, template ``vicuna_v1``) trains projector and decoder in two rounds: first on images with a
    single shape, where every answer about colour or kind is in the one image token that is not background, then
    on the full set. Without the easy round the decoder settles for answers from the question alone: with one to
    three shapes from the first step, colour stayed at chance for 400 steps; after 150 single-shape steps it
    was at 60% by step 400 and climbing.

    The tower stays frozen after stage 0, as LLaVA keeps CLIP frozen. Trained along (``--train-vision``, at the
    decoder's learning rate) its stage-0 features drift while the decoder is still random: the one-shape round
    ended at a loss of 0.30 instead of 0.036, and 300 full-set steps later the held-out score was 52% against 71%.
    Batches group samples of similar length (``--group-by-length``): 19% of the tokens were padding, 1.5% now.
    """
    from minillava.train import main as train_main

    t0 = time.perf_counter()
    paths = generate_dataset(work / "data", args.n_images, args.seed, "train", IMAGE_SIZE)
    easy_images = args.easy_steps * args.batch_size  # one-shape images, on indices after the full set's
    easy = generate_dataset(
        work / "data", easy_images, args.seed, "train", IMAGE_SIZE, start=args.n_images, max_shapes=1, stem="train_easy"
    )["qa"]
    log(f"wrote {args.n_images} + {easy_images} train images in {time.perf_counter() - t0:.0f}s")
    common = ["--batch-size", str(args.batch_size), "--precision", "fp32", "--seed", str(args.seed)]
    common += ["--warmup-ratio", "0.03", "--log-every", "10", "--no-progress"]
    # After stage 1 the checkpoint's template is "plain"; stage 2 names the real chat template again.
    finetune = ["--template", TEMPLATE, "--group-by-length", *(["--train-vision"] if args.train_vision else [])]
    stages = (
        ("pretrain", paths["captions"], init, "stage1", args.stage1_steps, ["--template", "plain"]),
        ("finetune", easy, work / "stage1", "stage2-easy", args.easy_steps, finetune),
        ("finetune", paths["qa"], work / "stage2-easy", "stage2", args.stage2_steps, finetune),
    )
    for stage, data, model_dir, out, steps, extra in stages:
        options = [*common, *extra]
        _run_trainer(train_main, model_dir, data, work / "data", work / out, stage, steps, args.lr, options, log)
    return work / "stage2"


def _run_trainer(train_main, model_dir, data, image_folder, out, stage, steps, lr, options, log) -> None:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    argv = ["--model", str(model_dir), "--data", str(data), "--image-folder", str(image_folder)]
    argv += ["--output", str(out), "--stage", stage, "--max-steps", str(steps), "--lr", str(lr), *options]
    log("python -m minillava.train " + " ".join(argv))
    if train_main(argv) != 0:
        raise RuntimeError(f"minillava.train failed ({stage} into {out})")
    log(f"{stage} -> {out}: {time.perf_counter() - t0:.0f}s")


EXAMPLE_SEARCH = 200  # images tried per example before giving up
EXAMPLE_START = 1000  # example images come from held-out indices past the 200 that eval_demo.py scores
# Per example file, the (qtype, fixed question or None) to try in order: the first that the model answers right
# on some image within EXAMPLE_SEARCH images is used. example-1 is what `make demo` asks.
EXAMPLES = (
    ("example-1.png", (("describe", "Describe the image briefly."), ("count", "How many shapes are there?"))),
    ("example-2.png", (("shape", None), ("position", None))),
    ("example-3.png", (("bigger", None), ("color", None), ("position", None))),
)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def pick_examples(model: minillava.Llava, processor, seed: int = SEED) -> list[dict]:
    """Held-out images for the bundled examples: per entry of ``EXAMPLES``, the first image from
    ``EXAMPLE_START`` on with two or more shapes whose question of that type the model answers exactly.

    Chosen among correct answers on purpose (the demo should show a right answer); the accuracy table,
    not these three, is the honest measure.
    """

    out: list[dict] = []
    index = EXAMPLE_START
    for name, choices in EXAMPLES:
        found = None
        for qtype, fixed in choices:
            found = _first_correct(model, processor, qtype, fixed, index, seed)
            if found is not None:
                break
        if found is None:
            raise RuntimeError(
                f"no held-out question for {name} answered right in {EXAMPLE_SEARCH} images: undertrained?"
            )
        index = int(found["source"].rsplit("-", 1)[1]) + 1  # each example gets its own image
        out.append({"image": name, **found})
    return out


def _first_correct(model: minillava.Llava, processor, qtype: str, fixed: str | None, start: int, seed: int):
    from minillava.generate import generate

    for index in range(start, start + EXAMPLE_SEARCH):
        questions = {q.qtype: q for q in iter_questions(1, seed, "heldout", IMAGE_SIZE, start=index)}
        q = questions.get(qtype)
        if q is None or int(questions["count"].answer) < 2:
            continue
        # A fixed prompt has the same answer as the drawn phrasing (the caption, or the count).
        question = fixed or q.question
        prompt = processor.format_chat([{"role": "user", "content": f"<image>\n{question}"}])
        enc = processor([prompt], [[q.image]], padding_side="left")
        with torch.no_grad():
            ids = generate(
                model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], max_new_tokens=MAX_NEW_TOKENS
            )
        if answers_match(processor.decode(ids[0], skip_special_tokens=True), q.answer):
            return {"question": question, "answer": q.answer, "qtype": qtype, "source": q.image_id, "pil": q.image}
    return None


def write_assets(model: minillava.Llava, tokenizer_dir: Path, dest: Path, settings: dict) -> None:
    """The bundled model directory: checkpoint (fp32), tokenizer files, example PNGs and ``examples.json``."""
    from minillava.processor import load_processor

    minillava.save(model, dest, extra_files=[tokenizer_dir / n for n in TOKENIZER_FILES], force=True)
    processor = load_processor(dest)
    examples = pick_examples(model, processor)
    for ex in examples:
        ex.pop("pil").save(dest / ex["image"], format="PNG")
    (dest / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
    (dest / "recipe.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    # The checkpoint writer creates private (0700/0600) temporary files; the package data should be readable.
    dest.chmod(0o755)
    for path in dest.iterdir():
        path.chmod(0o644)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the tokenizer and the random model, train stage 1 and stage 2, write the bundled model."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("build/train-demo"), help="scratch directory")
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="where the trained model goes")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the train images, the initial weights and the order")
    p.add_argument("--stage0-steps", type=int, default=600, help="tower pretraining steps (0: none)")
    p.add_argument("--stage0-lr", type=float, default=3e-3)
    p.add_argument("--stage1-steps", type=int, default=20)
    p.add_argument("--easy-steps", type=int, default=300, help="stage-2 steps on one-shape images first")
    p.add_argument("--stage2-steps", type=int, default=1550)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every stage")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-images", type=int, default=49600, help="distinct train images (49600 = 1550 x 32: each once)")
    p.add_argument("--eval-images", type=int, default=30, help="held-out images scored at the end (0: none)")
    p.add_argument("--patch-size", type=int, default=24)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-hidden", type=int, default=192)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument(
        "--train-vision",
        action="store_true",
        help="also train the tower in stage 2 (measured worse: see docs/bundled-model.md)",
    )
    # A fixed count: results are bit for bit only for the same thread count (and CPU). The bundled model was trained
    # on two, the cores of the machine it was made on.
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--assets-from", type=Path, help="skip training: write the assets from this trained checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for k in ("work", "out", "eval_images", "assets_from"):
        settings.pop(k)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.assets_from is not None:
        write_assets(minillava.load(args.assets_from), args.assets_from, args.out, settings)
        log(f"wrote {args.out}")
        return 0

    arch = Arch(
        patch_size=args.patch_size,
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        text_intermediate=round(args.text_hidden * 8 / 3 / 32) * 32,
        text_heads=args.text_hidden // 32,
        text_kv_heads=args.text_hidden // 64,
    )
    from minillava.processor import load_processor

    t0 = time.perf_counter()
    init = build_initial(args.work, arch, args, log, seed=args.seed)
    model = minillava.load(init)
    processor = load_processor(init)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"built in {time.perf_counter() - t0:.0f}s; {n_params / 1e6:.2f}M parameters; K={model.config.num_image_tokens}"
    )
    trained = train_with_trainer(init, args.work, args, log)
    model = minillava.load(trained)
    write_assets(model, trained, args.out, settings)
    log(f"wrote {args.out}")
    if args.eval_images:
        log(format_scores(evaluate(model, processor, args.eval_images)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
