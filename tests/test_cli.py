"""The minillava command line, end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillava import cli
from minillava.pipeline import Pipeline


@pytest.fixture(scope="module")
def ckpt(chat_checkpoint) -> Path:
    return chat_checkpoint


@pytest.fixture(scope="module")
def image(images) -> Path:
    return images[0]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_the_answer(ckpt, image, capsys):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(ckpt),
        "--image",
        str(image),
        "--prompt",
        "What is it?",
        "--max-new-tokens",
        "12",
    )
    assert code == 0, err
    expected = Pipeline(ckpt).chat("What is it?", images=[str(image)], max_new_tokens=12)
    assert expected and out == expected + "\n"


def test_generate_passes_every_flag_to_the_pipeline(ckpt, image, capsys):
    argv = ["generate", "--model", str(ckpt), "--image", str(image), "--prompt", "Hi", "--max-new-tokens", "8"]
    argv += ["--temperature", "1.2", "--top-p", "0.5", "--top-k", "5", "--seed", "4", "--dtype", "bfloat16"]
    argv += ["--system", "Be brief.", "--template", "llava_llama_2"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    pipe = Pipeline(ckpt, dtype=torch.bfloat16, template="llava_llama_2")
    flags = dict(system="Be brief.", max_new_tokens=8, temperature=1.2, top_p=0.5, top_k=5, seed=4)
    expected = pipe.chat("Hi", images=[str(image)], **flags)
    assert out == expected + "\n"
    # The comparison can fail: leaving out any one flag changes this answer.
    for dropped in ("system", "top_p", "top_k", "seed"):
        assert pipe.chat("Hi", images=[str(image)], **{k: v for k, v in flags.items() if k != dropped}) != expected
    assert Pipeline(ckpt, dtype=torch.bfloat16).chat("Hi", images=[str(image)], **flags) != expected  # template


def test_info(ckpt, capsys):
    code, out, _ = run(capsys, "info", "--model", str(ckpt))
    assert code == 0
    for needle in ("layout", "parameters", "vision", "projector", "llm", "float32", "context length  512 tokens"):
        assert needle in out
    assert "28x28 px (pad), 16 tokens per image" in out and "vicuna_v1" in out
    code, out, _ = run(capsys, "info", "--model", str(ckpt), "--json")
    info = json.loads(out)
    assert info["tokens_per_image"] == 16 and info["template"] == "vicuna_v1"
    params = info["parameters"]
    assert params["total"] == params["vision"] + params["projector"] + params["llm"]


def test_chat_session(ckpt, image, capsys, monkeypatch):
    lines = iter([f"/image {image}", "What is in the image?", "/image /no/such.png", "/bogus", "/reset", "Hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(capsys, "chat", "--model", str(ckpt), "--max-new-tokens", "8")
    assert code == 0, err
    pipe = Pipeline(ckpt)
    first = pipe.chat("What is in the image?", images=[str(image)], max_new_tokens=8)
    second = pipe.chat("Hi", max_new_tokens=8)  # after /reset: a fresh conversation without the image
    assert f"ASSISTANT: {first}\n" in out and f"ASSISTANT: {second}\n" in out
    assert "/no/such.png: no such image file" in out and "unknown command /bogus" in out


def test_chat_says_what_a_second_image_does(ckpt, images, capsys, monkeypatch):
    a, b = (str(p) for p in images)
    lines = iter([f"/image {a}", f"/image {b}", "What is it?", f"/image {a}", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(capsys, "chat", "--model", str(ckpt), "--max-new-tokens", "4")
    assert code == 0, err
    assert f"(image {b} replaces {a} for your next message)" in out
    # The answer was about b alone: a replaced image is not sent.
    assert f"ASSISTANT: {Pipeline(ckpt).chat('What is it?', images=[b], max_new_tokens=4)}\n" in out
    assert "the conversation already has 1 image(s) and keeps them" in out and "/reset" in out


def test_chat_ctrl_c_stops_the_answer_not_the_program(ckpt, capsys, monkeypatch):
    from minillava.pipeline import Conversation

    def interrupted(self, prompt, images=None, **gen):
        def pieces():
            yield "partial"
            raise KeyboardInterrupt

        return pieces()

    lines = iter(["first", "second"])

    def read(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(Conversation, "stream", interrupted)
    monkeypatch.setattr("builtins.input", read)
    code, out, _ = run(capsys, "chat", "--model", str(ckpt))
    assert code == 0
    assert out.count("ASSISTANT: partial [stopped]") == 2  # both messages were answered; Ctrl-D then left


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "--model", "/no/such/dir"], "/no/such/dir"),
        (["generate", "--model", "{ckpt}", "--prompt", "x", "--image", "/no/img.png"], "/no/img.png: no such image"),
        (["generate", "--model", "{ckpt}", "--prompt", "x", "--temperature", "-1"], "temperature must be"),
        (["generate", "--model", "{ckpt}", "--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["generate", "--model", "{ckpt}", "--prompt", "x", "--max-new-tokens", "900"], "context window of 512"),
        (["generate", "--model", "{ckpt}", "--prompt", "x", "--template", "nope"], "unknown chat template 'nope'"),
        (["generate", "--model", "{ckpt}", "--prompt", "x", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_errors_are_one_line(ckpt, capsys, argv, message):
    code, _, err = run(capsys, *[a.replace("{ckpt}", str(ckpt)) for a in argv])
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"minillava {argv[0]}: error: ")
    assert message in err


def test_no_model_and_no_bundled_model(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "BUNDLED_MODEL", tmp_path / "missing")
    code, _, err = run(capsys, "generate", "--prompt", "hi")
    assert code == 1 and "no --model given and no bundled model found" in err


@pytest.mark.parametrize("command", ["generate", "chat", "info"])
def test_help_is_complete(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    options = {
        "generate": [
            "--model",
            "--image",
            "--prompt",
            "--template",
            "--max-new-tokens",
            "--temperature",
            "--top-p",
            "--top-k",
            "--seed",
            "--dtype",
            "--system",
        ],
        "chat": ["--model", "--image", "/image PATH", "/reset", "/quit", "Ctrl-C", "Ctrl-D"],
        "info": ["--model", "--json"],
    }[command]
    for option in options:
        assert option in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"minillava {cli.version()}" and cli.version()[0].isdigit()


def test_device_flag_and_auto(ckpt, image, capsys):
    from minillava.device import resolve_device

    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == auto
    assert Pipeline(ckpt).model.llm.embed_tokens.weight.device.type == auto.type
    code, out, err = run(
        capsys, "generate", "--model", str(ckpt), "--image", str(image), "--prompt", "Hi", "--device", "cpu"
    )
    assert code == 0, err
    assert out == Pipeline(ckpt, device="cpu").chat("Hi", images=[str(image)]) + "\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_clear_error(ckpt, capsys):
    code, _, err = run(capsys, "chat", "--model", str(ckpt), "--device", "cuda")
    assert code == 1 and err.count("\n") == 1
    assert "sees no CUDA GPU" in err and "use cpu" in err


def test_loading_notice_only_when_slow(capsys):
    import time

    from minillava.progress import notice_if_slow

    with notice_if_slow("loading quick"):
        pass
    with notice_if_slow("loading slow...", after=0.05):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "loading quick" not in err
    assert err.startswith("loading slow...\nready after 0.") and err.count("\n") == 2


def test_info_and_convert_take_unconverted_folders(hf_reference, tmp_path, capsys):
    _, _, converted = hf_reference(seed=3)
    llava_hf = converted.parent / "hf"
    capsys.readouterr()  # the fixture's conversion message
    code, out, err = run(capsys, "info", "--model", str(llava_hf), "--json")
    assert code == 0, err
    unconverted = json.loads(out)
    code, out, _ = run(capsys, "info", "--model", str(converted), "--json")
    assert unconverted["layout"] == "llava-hf"
    assert {k: v for k, v in unconverted.items() if k != "path"} == {
        k: v for k, v in json.loads(out).items() if k != "path"
    }
    code, out, err = run(capsys, "convert", str(llava_hf), str(tmp_path / "again"))
    assert code == 0, err
    assert "from llava-hf" in out and (tmp_path / "again" / "config.json").is_file()
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    assert capsys.readouterr().out.startswith("usage: minillava convert")


def test_train_takes_an_unconverted_folder(train_setup, tmp_path, capsys):
    """Training from the llava-hf export of a checkpoint is training from the checkpoint: the same losses."""
    model, data, images = train_setup
    hf = tmp_path / "hf"
    assert cli.main(["convert", "--to", "hf", str(model), str(hf)]) == 0
    common = ["--data", str(data), "--image-folder", str(images), "--max-steps", "2", "--precision", "fp32"]
    common += ["--batch-size", "4", "--lr", "3e-3", "--no-progress"]
    for name, src in (("from-minillava", model), ("from-hf", hf)):
        assert cli.main(["train", "--model", str(src), "--output", str(tmp_path / name), *common]) == 0
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        for name in ("from-minillava", "from-hf")
    ]
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_train_is_forwarded(monkeypatch):
    import minillava.train

    seen = []
    monkeypatch.setattr(minillava.train, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["train", "--foo", "bar"]) == 7
    assert seen == [["--foo", "bar"]]


def test_python_dash_m_runs_the_cli(ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "minillava", "info", "--model", str(ckpt)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokens per image" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_refuses_a_device_that_is_not_there(capsys):
    code, _, err = run(capsys, "serve", "--device", "cuda", "--port", "0")
    assert code == 1 and "device 'cuda'" in err and "sees no CUDA GPU; use cpu" in err
