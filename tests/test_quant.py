"""Weight-only int8 / int4: quantisation bounds, each layer against its own dequantised weight, a quantised model
against the float model holding its dequantised weights, checkpoints that round-trip bit for bit, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import minillava
from minillava import linear, quant
from minillava.config import BUNDLED_MODEL
from weights_convert.__main__ import main as convert_main

SCHEMES = ("int8", "int4")
# Output rounding of the kernels, relative to the output's scale: fp32 sums in another order than F.linear (and
# may apply an int8 row scale after the sum), bf16 rounds the output (one bf16 ulp is 2**-8 = 3.9e-3 relative).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 4e-3}


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    assert_close(got.float(), want, rtol=tol, atol=tol * float(want.detach().abs().max()))


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight with rows and groups of very different ranges (outliers included), as trained layers have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen).exp()
    w[0, 5] = 40.0  # one outlier row
    w[1] = 0.0  # an all-zero row
    w[2, :32] = 0.25  # a constant group
    return w


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_is_within_half_a_step(scale_dtype):
    w = weight(48, 96)
    codes, scale = quant.quantize_int8(w, scale_dtype)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    error = (quant.dequantize_int8(codes, scale, torch.float32) - w).abs()
    step = scale.float()[:, None]
    # Half a step, plus the rounding of the scale itself when it is stored in bf16 (the code is at most 127 steps).
    slack = 0 if scale_dtype == torch.float32 else 127 * step * 2**-8
    assert bool((error <= step / 2 * (1 + 1e-6) + slack).all())
    assert int(error[1].count_nonzero()) == 0


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_is_within_half_a_step(scale_dtype):
    w = weight(48, 96)
    codes, scales_and_zeros = quant.quantize_int4(w, scale_dtype)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scales_and_zeros.shape == (96 // quant.INT4_GROUP, 48, 2)
    error = (quant.dequantize_int4(codes, scales_and_zeros, torch.float32) - w).abs()
    step = scales_and_zeros[..., 0].float().t().repeat_interleave(quant.INT4_GROUP, dim=1)
    slack = 0 if scale_dtype == torch.float32 else (w.abs() + 8 * step) * 2**-7
    assert bool((error <= step / 2 * (1 + 1e-5) + slack).all())
    assert int(error[1].count_nonzero()) == 0 and int(error[2, :32].count_nonzero()) == 0
    assert torch.equal(quant.bytes_to_nibbles(quant.nibbles_to_bytes(codes)), codes)


@pytest.mark.parametrize("rows", [320, 48])  # a 256-row block plus a ragged one; less than one block
def test_int4_kernel_layout_round_trips(rows):
    codes, _ = quant.quantize_int4(weight(rows, 64), torch.float32)
    packed = quant.int4_pack(lambda a, b: codes[a:b], rows)
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(codes.int(), 2))  # blocks pack as a whole
    assert torch.equal(quant.int4_codes(packed, rows, 0, rows), codes)
    if rows > 256:
        assert torch.equal(quant.int4_codes(packed, rows, 256, rows), codes[256:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 3, 16, 200])  # fused kernel (<= FUSED_ROWS rows), dequantised tiles above
def test_quantized_linear_equals_its_dequantized_weight(scheme, dtype, rows, monkeypatch):
    monkeypatch.setattr(linear, "TILE_BYTES", 1)  # the smallest tiles: several of them, the last one ragged
    dense = nn.Linear(96, 272, bias=True)
    with torch.no_grad():
        dense.weight.copy_(weight(272, 96, seed=1))
    layer = quant.LAYERS[scheme].from_linear(dense.to(dtype))
    x = torch.randn(2, rows, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = F.linear(x.float(), layer.dequantize(dtype=torch.float32), layer.bias.float())
    got = layer(x)
    assert got.shape == (2, rows, 272) and got.dtype == dtype
    assert_close_to_scale(got, want, dtype)


def dequantized_copy(model: minillava.Llava) -> minillava.Llava:
    """A full-precision model whose decoder linear layers hold ``model``'s dequantised weights."""
    copy = minillava.load(BUNDLED_MODEL)
    with torch.no_grad():
        for name in quant.quantized_linear_names(copy):
            copy.get_submodule(name).weight.copy_(model.get_submodule(name).dequantize(dtype=torch.float32))
    return copy


@pytest.fixture(scope="module")
def prompt():
    ids = torch.tensor([[1, *range(20, 60)]])
    return ids


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_generates_what_its_dequantized_weights_do(scheme, prompt):
    model = minillava.load(BUNDLED_MODEL, quantize=scheme)
    assert isinstance(model.llm.lm_head, quant.Int8Linear)  # int4 keeps the head at int8
    assert isinstance(model.llm.layers[0].mlp.down_proj, quant.LAYERS[scheme])
    assert isinstance(model.projector.layers[0], nn.Linear)  # the projector and the tower stay as loaded
    reference = dequantized_copy(model)
    with torch.no_grad():
        assert_close(model(prompt).logits, reference(prompt).logits, rtol=1e-5, atol=1e-5)
    want = minillava.generate(reference, prompt, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(minillava.generate(model, prompt, max_new_tokens=24, eos_token_id=[]), want)
    # The compiled decode step runs the same kernels.
    assert torch.equal(minillava.generate(model, prompt, max_new_tokens=24, eos_token_id=[], compile=True), want)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_checkpoint_round_trips_bit_for_bit(scheme, prompt, tmp_path):
    loaded = minillava.load(BUNDLED_MODEL, dtype=torch.bfloat16, quantize=scheme)
    assert loaded.config.quantization["scheme"] == scheme
    minillava.save(loaded, tmp_path / "saved")
    converted = tmp_path / "converted"
    assert convert_main([str(BUNDLED_MODEL), str(converted), "--dtype", "bfloat16", "--quantize", scheme]) == 0
    for path in (tmp_path / "saved", converted):
        again = minillava.load(path)
        assert again.config.quantization == loaded.config.quantization
        state, want = again.state_dict(), loaded.state_dict()
        assert state.keys() == want.keys()
        assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in want)
    with torch.no_grad():
        assert torch.equal(again(prompt).logits, loaded(prompt).logits)
    assert minillava.load(converted, quantize=scheme).config.quantization["scheme"] == scheme  # same scheme: as is


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unconverted_checkpoint_quantizes_as_its_conversion_does(scheme, hf_reference):
    _, _, converted = hf_reference(seed=3)
    direct = minillava.load(converted.parent / "hf", quantize=scheme).state_dict()  # the llava-hf source
    want = minillava.load(converted, quantize=scheme).state_dict()
    assert direct.keys() == want.keys()
    assert all(torch.equal(direct[k], want[k]) for k in want)


def test_bad_requests_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="'int8', 'int4' or None, got 'int3'"):
        minillava.load(BUNDLED_MODEL, quantize="int3")
    with pytest.raises(ValueError, match="'int8', 'int4' or None"):
        minillava.Pipeline(quantize="int3")
    assert convert_main([str(BUNDLED_MODEL), str(tmp_path / "q8"), "--quantize", "int8"]) == 0
    with pytest.raises(ValueError, match="already quantised as int8; it cannot be quantised again as int4"):
        minillava.load(tmp_path / "q8", quantize="int4")
    assert convert_main([str(tmp_path / "q8"), str(tmp_path / "q4"), "--quantize", "int4"]) == 1
    assert convert_main([str(tmp_path / "q8"), str(tmp_path / "hf"), "--to", "hf"]) == 1
    with pytest.raises(ValueError, match="already quantised"):
        quant.quantize_model(minillava.load(tmp_path / "q8"), "int8")
    with pytest.raises(ValueError, match="in_features divisible by 32.*quantize this model with 'int8'"):
        quant.Int4Linear.from_linear(nn.Linear(48, 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_upcast_tiles_equal_f_linear_within_rounding(dtype, bias, monkeypatch):
    monkeypatch.setattr(linear, "TILE_BYTES", 1)  # several tiles, the last one ragged
    monkeypatch.setattr(linear, "gemm_dtype", lambda d, device: torch.float32)  # the path of a CPU without bf16 GEMMs
    layer = linear.Linear(96, 272, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight(272, 96, seed=4))
    x = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(5)).to(dtype)
    want = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == dtype and got.shape == (3, 40, 272)
    # One rounding of the fp32 result: within half a unit in the last place of the half-precision output (plus the
    # fp32 summation order's own difference).
    half_ulp = torch.finfo(dtype).eps / 2 * want.abs() * (1 + 1e-3) + 1e-6
    assert bool(((got.float() - want).abs() <= half_ulp).all())
    assert_close_to_scale(got, F.linear(x, layer.weight, layer.bias).float(), torch.bfloat16)
    with torch.no_grad():  # few rows keep F.linear itself
        assert torch.equal(layer(x[:1, :3]), F.linear(x[:1, :3], layer.weight, layer.bias))
        # A non-contiguous input: torch's linear adds the bias after rounding the product, and so does the layer.
        strided = x.transpose(0, 1)
        want = F.linear(strided, layer.weight, layer.bias).float()
        assert (layer(strided).float() != want).float().mean() < 0.01  # only near-ties round the other way


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_linear_passes_gradients_to_its_input(scheme):
    dense = nn.Linear(96, 272, bias=False)
    layer = quant.LAYERS[scheme].from_linear(dense)
    x = torch.randn(50, 96, requires_grad=True)
    layer(x).square().sum().backward()
    w = layer.dequantize(dtype=torch.float32)
    want = 2 * (x.detach() @ w.t()) @ w
    assert_close_to_scale(x.grad, want, torch.float32)
