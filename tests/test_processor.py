"""The processor: a converted checkpoint directory in, model inputs out; and how llava-hf's processor differs."""

import dataclasses
import io

import pytest
import torch
from PIL import Image

from minillava.chat import format_chat
from minillava.config import ImageConfig, LlavaConfig, TextConfig, VisionConfig
from minillava.processor import Processor, load_processor
from minillava.tokenizer import Tokenizer
from tests.sp_fixtures import VOCAB_SIZE, SlowLlamaReference, write_tokenizer_dir

IMAGE_ID, PAD_ID = VOCAB_SIZE, VOCAB_SIZE + 1
K = 4  # a 28x28 tower with 14x14 patches


def _config(image_token_id=IMAGE_ID, layout="llava-hf", template=None, mode="crop"):
    return LlavaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28),
        text=TextConfig(
            vocab_size=VOCAB_SIZE + 64,
            hidden_size=16,
            intermediate_size=32,
            num_layers=2,
            num_heads=2,
            rms_norm_eps=1e-5,
            pad_token_id=PAD_ID,
        ),
        image_token_id=image_token_id,
        image=ImageConfig(mode=mode, shortest_edge=28, crop_size=28),
        chat_template=template,
        source_layout=layout,
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A llava-hf style checkpoint: <image> and <pad> added tokens, legacy=false."""
    path = write_tokenizer_dir(tmp_path_factory.mktemp("hf"), legacy=False)
    _config().save(path)
    return path


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory):
    """An original-layout checkpoint: bare sentencepiece vocabulary, placeholder id past it, no pad token."""
    path = write_tokenizer_dir(tmp_path_factory.mktemp("orig"), added_tokens=(), pad_token=None, legacy=None)
    cfg = _config(image_token_id=VOCAB_SIZE + 7, layout="original", template="llava_v1", mode="pad")
    cfg.text.pad_token_id = 0
    cfg.save(path)
    return path


def _png(width, height, colour=(200, 30, 60)):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_load_processor_reads_the_checkpoint(hf_dir, original_dir):
    proc = load_processor(hf_dir)
    assert (proc.image_token_id, proc.num_image_tokens, proc.pad_token_id) == (IMAGE_ID, K, PAD_ID)
    assert proc.template.name == "llava_hf" and proc.image_config.mode == "crop"
    assert isinstance(proc.tokenizer, Tokenizer) and not proc.tokenizer.legacy
    orig = load_processor(original_dir)
    assert orig.template.name == "llava_v1" and orig.image_config.mode == "pad" and orig.tokenizer.legacy
    assert orig.pad_token_id == 0  # no pad token in the tokenizer: the config's (vicuna's unk)
    assert load_processor(hf_dir, image_mode="pad").image_config.mode == "pad"
    assert load_processor(hf_dir, template="vicuna_v1").template.name == "vicuna_v1"
    with pytest.raises(ValueError, match="image_mode must be one of crop, pad, anyres"):
        load_processor(hf_dir, image_mode="squash")


def test_single_prompt(hf_dir):
    proc = load_processor(hf_dir)
    text = proc.format_chat([{"role": "user", "content": "<image>\nWhat colour is it?"}])
    assert text == "USER: <image>\nWhat colour is it? ASSISTANT:"
    batch = proc(text, images=[_png(40, 20)])
    ids = batch["input_ids"][0].tolist()
    assert ids == SlowLlamaReference(hf_dir).image_prompt(text, K, IMAGE_ID)
    assert ids.count(IMAGE_ID) == K and batch["attention_mask"].tolist() == [[1] * len(ids)]
    assert batch["pixel_values"].shape == (1, 3, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert proc(text, images=_png(40, 20))["input_ids"].equal(batch["input_ids"])  # a lone image needs no list
    assert proc.decode(ids) == "USER:  \nWhat colour is it? ASSISTANT:"  # the spaces around the image are real ids


def test_batch_padding_and_image_order(hf_dir):
    proc = load_processor(hf_dir)
    red, green, blue = _png(30, 30, (255, 0, 0)), _png(30, 30, (0, 255, 0)), _png(30, 30, (0, 0, 255))
    texts = ["<image>\nA long question about two images <image> here?", "Hi", "<image> short"]
    left = proc(texts, images=[[red, green], [], [blue]])
    right = proc(texts, images=[[red, green], None, [blue]], padding_side="right")
    lengths = [len(proc.encode(t)) for t in texts]
    for row, n in enumerate(lengths):
        assert left["attention_mask"][row].tolist() == [0] * (max(lengths) - n) + [1] * n
        assert right["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert left["input_ids"][row, -n:].tolist() == right["input_ids"][row, :n].tolist() == proc.encode(texts[row])
    assert (left["input_ids"][left["attention_mask"] == 0] == PAD_ID).all()
    # Images in marker order across the batch: red, green (prompt 0), blue (prompt 2).
    pixels = left["pixel_values"]
    assert pixels.shape == (3, 3, 28, 28)
    assert [int(pixels[i, :, 0, 0].argmax()) for i in range(3)] == [0, 1, 2]
    assert torch.equal(pixels, right["pixel_values"])


def test_text_only(hf_dir, original_dir):
    for path in (hf_dir, original_dir):
        proc = load_processor(path)
        batch = proc("Hello there")
        assert batch["pixel_values"] is None and batch["input_ids"][0].tolist() == proc.encode("Hello there")


def test_original_layout_placeholder_past_the_vocabulary(original_dir):
    proc = load_processor(original_dir)
    text = format_chat([{"role": "user", "content": "<image>\nDescribe it."}], "llava_v1")
    batch = proc(text, images=[_png(50, 10)])
    ids = batch["input_ids"][0].tolist()
    assert ids == SlowLlamaReference(original_dir).image_prompt(text, K, VOCAB_SIZE + 7)
    assert proc.decode(ids).endswith("USER:  \nDescribe it. ASSISTANT:")
    assert "<image>" * K in proc.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize(("markers", "images"), [(1, 0), (1, 2), (0, 1), (2, 1)])
def test_marker_count_must_match_images(hf_dir, markers, images):
    proc = load_processor(hf_dir)
    text = "look " + "<image> " * markers
    with pytest.raises(ValueError, match=f"{markers} <image> marker\\(s\\) but {images} image\\(s\\)"):
        proc(text, images=[_png(8, 8)] * images)


def test_batch_errors(hf_dir):
    proc = load_processor(hf_dir)
    with pytest.raises(ValueError, match="prompt 1: 1 <image> marker\\(s\\) but 0 image"):
        proc(["<image> a", "<image> b"], images=[[_png(8, 8)], []])
    with pytest.raises(ValueError, match="one list of images per prompt"):
        proc(["<image> a", "b"], images=_png(8, 8))
    with pytest.raises(ValueError, match="2 prompts but 1 image lists"):
        proc(["<image> a", "b"], images=[[_png(8, 8)]])
    with pytest.raises(ValueError, match="images\\[0\\] must be a list"):
        proc(["<image> a"], images=[_png(8, 8)])  # a flat list for a batch of one
    with pytest.raises(ValueError, match="empty prompt"):
        proc("   ")
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        proc(["ok", ""])
    with pytest.raises(ValueError, match="a prompt must be a str, got int"):
        proc([3])
    with pytest.raises(ValueError, match="empty batch"):
        proc([])
    with pytest.raises(ValueError, match="padding_side"):
        proc("hi", padding_side="center")


def test_placeholder_id_must_agree_with_the_tokenizer(tmp_path):
    path = write_tokenizer_dir(tmp_path, legacy=False)
    tok = Tokenizer.from_dir(path)
    with pytest.raises(ValueError, match=f"image_token_id {PAD_ID} but the tokenizer .* has <image> = {IMAGE_ID}"):
        Processor(tok, ImageConfig(), image_token_id=PAD_ID, num_image_tokens=K)
    bare = Tokenizer.from_dir(write_tokenizer_dir(tmp_path / "bare", added_tokens=(), pad_token=None))
    with pytest.raises(ValueError, match="image_token_id 300 is an ordinary token"):
        Processor(bare, ImageConfig(), image_token_id=300, num_image_tokens=K)


def test_image_errors_name_the_image(hf_dir, tmp_path):
    proc = load_processor(hf_dir, max_pixels=1000)
    with pytest.raises(ValueError, match="image 1 .*over the limit of 1,000"):
        proc("<image><image>", images=[_png(10, 10), _png(100, 100)])
    broken = tmp_path / "broken.png"
    broken.write_bytes(_png(64, 64)[:60])
    with pytest.raises(OSError, match="broken.png"):
        load_processor(hf_dir)("<image>", images=[broken])


# --- transformers' llava-hf processor: where its ids differ from original LLaVA's, for the same prompt ---


def _hf_processor(path):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(path),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


@pytest.mark.parametrize("legacy", [False, True])
def test_llava_hf_processor_differences(tmp_path, legacy):
    """Facts for docs/inputs.md, with the original (slow tokenizer, chunk rule) on one side and transformers'
    LlavaProcessor (fast tokenizer over the expanded string) on the other:

    - text opening with a space after an image ("<image> ASSISTANT:"): the original keeps the dummy-prefix "▁"
      as its own id, transformers does not;
    - "<image>\\n" with legacy=false: the original writes "▁" before the newline, transformers does not;
    - everything else is the same.
    """
    path = write_tokenizer_dir(tmp_path, legacy=legacy)
    _config().save(path)
    ours, theirs = load_processor(path), _hf_processor(path)
    space = ours.tokenizer.token_to_id("▁")

    def compare(text):
        n = text.count("<image>")
        a = ours(text, images=[_png(28, 28)] * n)["input_ids"][0].tolist()
        b = theirs(text=text, images=[Image.new("RGB", (28, 28))] * n, return_tensors="pt")["input_ids"][0].tolist()
        return a, b

    def drop_space_after_images(ids):
        return [t for i, t in enumerate(ids) if not (t == space and i and ids[i - 1] == IMAGE_ID)]

    newline = "USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: <image>\nAnd this? ASSISTANT:"
    a, b = compare(newline)
    assert a == b if legacy else (a != b and drop_space_after_images(a) == b)
    spaced = "USER: What is <image> this? ASSISTANT:"
    a, b = compare(spaced)
    assert a != b and drop_space_after_images(a) == b
    a, b = compare("USER: Just text, 123. ASSISTANT:")
    assert a == b


def test_pixels_match_the_images_own_preprocessing(hf_dir):
    proc = load_processor(hf_dir, image_mode="pad")
    from minillava.image import preprocess

    data = _png(40, 12)
    batch = proc("<image>", images=[data])
    assert torch.equal(batch["pixel_values"], preprocess([data], dataclasses.replace(proc.image_config)))
