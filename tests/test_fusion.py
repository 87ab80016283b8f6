"""The splice of image rows into token embeddings, and the projector types transformers lacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from minillava.fusion import embed_with_images
from minillava.projector import Projector


def test_rows_land_in_order_and_placeholder_is_never_embedded():
    embed = nn.Embedding(10, 4)
    placeholder = 10_000  # outside the vocabulary, as for original LLaVA checkpoints
    ids = torch.tensor([[1, placeholder, placeholder, 2], [placeholder, placeholder, 3, 4]])
    rows = torch.arange(16, dtype=torch.float32).reshape(2, 2, 4)
    out = embed_with_images(embed, ids, rows, placeholder)
    assert_close(out[0, 1:3], rows[0])
    assert_close(out[1, 0:2], rows[1])
    assert_close(out[0, 0], embed.weight[1])
    assert_close(out[1, 3], embed.weight[4])


@pytest.mark.parametrize("n_placeholders, n_images", [(3, 2), (4, 1), (2, 0)])
def test_count_mismatch_names_both_counts(n_placeholders, n_images):
    embed = nn.Embedding(10, 4)
    ids = torch.tensor([[5] * n_placeholders + [1]])
    rows = torch.zeros(n_images, 2, 4) if n_images else None
    with pytest.raises(ValueError, match=f"{n_placeholders} image placeholders .* {n_images * 2} feature rows"):
        embed_with_images(embed, ids, rows, 5)


def test_linear_and_deep_mlp_projectors():
    x = torch.randn(2, 3, 8)
    linear = Projector("linear", 8, 6)
    assert_close(linear(x), F.linear(x, linear.layers[0].weight, linear.layers[0].bias))
    mlp = Projector("mlp3x_gelu", 8, 6, bias=False)
    h = x
    for i, layer in enumerate(mlp.layers):
        h = F.linear(F.gelu(h) if i else h, layer.weight)
    assert_close(mlp(x), h)
    assert len(mlp.layers) == 3 and mlp.layers[0].bias is None
    assert torch.equal(Projector("identity", 8, 8)(x), x)
    with pytest.raises(ValueError, match="identity projector needs equal widths"):
        Projector("identity", 8, 6)
    with pytest.raises(ValueError, match="unknown projector type"):
        Projector("mlp2x_relu", 8, 6)
