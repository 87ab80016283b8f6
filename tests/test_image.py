"""Image preprocessing: pixel parity with transformers' PIL CLIP/LLaVA processors, and hostile inputs."""

import dataclasses
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

from minillava.config import ImageConfig
from minillava.image import ImageDecodeError, ImageTooLargeError, expand_to_square, load_image, preprocess

TOL = 1e-6
CLIP = ImageConfig()  # llava-1.5: 336, CLIP mean/std, bicubic
SMALL = ImageConfig(shortest_edge=64, crop_size=56, mean=(0.5, 0.25, 0.75), std=(0.2, 0.3, 0.4))


def _processor_kwargs(cfg):
    return {
        "size": {"shortest_edge": cfg.shortest_edge},
        "crop_size": {"height": cfg.crop_size, "width": cfg.crop_size},
        "image_mean": list(cfg.mean),
        "image_std": list(cfg.std),
        "resample": cfg.resample,
        "rescale_factor": cfg.rescale_factor,
    }


def clip_reference(rgb, cfg):
    """llava-hf's preprocessing: transformers' PIL CLIP processor (named explicitly: the default is torchvision)."""
    out = CLIPImageProcessorPil(**_processor_kwargs(cfg))(rgb, return_tensors="np")["pixel_values"]
    return torch.from_numpy(out)


def original_expand2square(img, background):
    """Original LLaVA's mm_utils.expand2square, restated."""
    width, height = img.size
    if width == height:
        return img
    if width > height:
        result = Image.new(img.mode, (width, width), background)
        result.paste(img, (0, (width - height) // 2))
        return result
    result = Image.new(img.mode, (height, height), background)
    result.paste(img, ((height - width) // 2, 0))
    return result


def pad_references(rgb, cfg):
    """Original LLaVA's pad pipeline (expand2square, then CLIP) and transformers' LlavaImageProcessorPil(do_pad)."""
    original = clip_reference(original_expand2square(rgb, tuple(int(x * 255) for x in cfg.mean)), cfg)
    llava = LlavaImageProcessorPil(do_pad=True, **_processor_kwargs(cfg))(rgb, return_tensors="np")["pixel_values"]
    return original, torch.from_numpy(llava)


def make_image(width, height, mode, seed=0):
    """Noise over a gradient (so resampling has work to do), in the requested PIL mode."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], axis=-1)
    rgb = Image.fromarray(np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L"))
        return rgba
    if mode == "LA":
        return rgb.convert("LA")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)


def encode(img, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _check(ours, *refs):
    worst = 0.0
    for ref in refs:
        assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= TOL, worst


MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK"]
SIZES = [(17, 200), (200, 17), (37, 35), (5, 5), (64, 64)]


def _both_modes(data, cfg):
    rgb = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")  # as original LLaVA does
    _check(preprocess([data], dataclasses.replace(cfg, mode="crop")), clip_reference(rgb, cfg))
    _check(preprocess([data], dataclasses.replace(cfg, mode="pad")), *pad_references(rgb, cfg))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_mode_and_odd_size_matches(mode, size):
    # CMYK goes through JPEG (PNG cannot hold it); a custom size/mean/std shows they come from the config.
    _both_modes(encode(make_image(*size, mode), "JPEG" if mode == "CMYK" else "PNG"), SMALL)


@pytest.mark.parametrize("size", [(17, 200), (200, 17), (337, 335)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_llava_1_5_settings_match(size):
    _both_modes(encode(make_image(*size, "RGB")), CLIP)


@pytest.mark.parametrize(
    ("size", "cfg"),
    [((1, 60), CLIP), ((60, 1), CLIP), ((1, 200), SMALL), ((200, 1), SMALL), ((1, 1), CLIP), ((3, 1), SMALL)],
    ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v.crop_size),
)
def test_slivers_match(size, cfg):
    _both_modes(encode(make_image(*size, "RGB")), cfg)


def test_large_jpeg_matches(tmp_path):
    path = tmp_path / "large.jpg"
    path.write_bytes(encode(make_image(1999, 1333, "RGB", seed=3), "JPEG", quality=90))
    _both_modes(path, CLIP)


def test_every_input_kind_gives_the_same_pixels(tmp_path):
    img = make_image(40, 30, "RGB")
    path = tmp_path / "a.png"
    path.write_bytes(encode(img))
    batch = preprocess([str(path), path, path.read_bytes(), img, Image.open(path)], SMALL)
    assert batch.shape == (5, 3, 56, 56) and batch.dtype == torch.float32
    assert all(torch.equal(batch[0], batch[i]) for i in range(1, 5))
    assert preprocess([], SMALL).shape == (0, 3, 56, 56)


def test_pad_fills_with_the_mean_colour():
    wide = make_image(80, 20, "RGB")
    padded = expand_to_square(wide, (122, 116, 104))
    assert padded.size == (80, 80) and padded.getpixel((0, 0)) == (122, 116, 104)
    assert padded.getpixel((5, 30)) == wide.getpixel((5, 0))  # pasted at (0, (80-20)//2)
    pixels = preprocess([wide], ImageConfig(mode="pad"))[0]
    fill = (torch.tensor([122, 116, 104], dtype=torch.float64) / 255).float()
    expected = (fill - torch.tensor(CLIP.mean)) / torch.tensor(CLIP.std)
    assert torch.equal(pixels[:, 0, 0], expected) and torch.equal(pixels[:, -1, -1], expected)
    assert not torch.equal(preprocess([wide], CLIP)[0][:, 0, 0], expected)  # crop mode: no fill anywhere


def test_rgba_is_converted_like_original_llava_not_composited_on_white():
    """Fact for docs/inputs.md: transformers 5.x's PIL processor composites transparency onto white; original LLaVA
    (and this package) use Image.convert("RGB"), which keeps the colour under the alpha."""
    rgba = make_image(40, 30, "RGBA")
    ours = preprocess([rgba], SMALL)
    _check(ours, clip_reference(rgba.convert("RGB"), SMALL))
    assert (ours - clip_reference(rgba, SMALL)).abs().max() > 0.1
    opaque = rgba.copy()
    opaque.putalpha(255)
    _check(preprocess([opaque], SMALL), clip_reference(opaque, SMALL))  # no transparency, no difference


# --- hostile inputs ---


def _png_header_only(width, height):
    """A PNG that declares width x height but carries 100 bytes of pixel data: decoding it would fail."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_truncated_file_names_the_file(tmp_path, fmt):
    data = encode(make_image(120, 90, "RGB"), fmt)
    path = tmp_path / f"broken.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=f"broken.{fmt.lower()}.*truncated"):
        preprocess([path], SMALL)


def test_non_image_file_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ImageDecodeError, match="notes.txt: not an image file"):
        load_image(path)
    with pytest.raises(ImageDecodeError, match="image 1 \\(<image bytes, 5 bytes>\\): not an image file"):
        preprocess([encode(make_image(4, 4, "RGB")), b"hello"], SMALL)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="got int"):
        load_image(3)


@pytest.mark.parametrize(("width", "height"), [(10_000, 9_000), (60_000, 60_000)])
def test_huge_image_is_refused_from_its_header(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    start = time.perf_counter()
    # Too large, not "cannot decode": the pixels were never looked at (they would not decode).
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        load_image(path)
    assert time.perf_counter() - start < 0.5


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(2000, 1000))
    with pytest.raises(ImageTooLargeError, match="2000x1000 = 2,000,000 pixels, over the limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="big.png"):  # allowed through, then the bogus pixels fail to decode
        load_image(path, max_pixels=3_000_000)
    img = make_image(30, 20, "RGB")
    assert load_image(img, max_pixels=None).size == (30, 20)
    with pytest.raises(ImageTooLargeError, match="the image is 30x20"):
        load_image(img, max_pixels=500)


def test_pixel_limit_covers_what_preprocessing_would_allocate():
    sliver = make_image(1, 500, "RGB")  # 500 pixels that become a 500x500 square or a 336x168000 resize
    with pytest.raises(ImageTooLargeError, match="the padded square is 500x500"):
        preprocess([sliver], ImageConfig(mode="pad"), max_pixels=100_000)
    with pytest.raises(ImageTooLargeError, match="the resized image is 336x168000"):
        preprocess([sliver], CLIP, max_pixels=10_000_000)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(Path(tmp_path).name)):
        load_image(tmp_path)
