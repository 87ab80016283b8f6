"""Hostile input on the command lines: one clear line naming the input and the fix, a chat that survives it, and
no traceback for Ctrl-C, even during start-up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minillava import cli
from weights_convert.__main__ import main as convert_main

ROOT = Path(__file__).resolve().parents[1]


def test_a_prompt_that_is_not_utf8_is_refused_in_one_line(chat_checkpoint, capsys):
    # Python hands undecodable command-line bytes over as lone surrogates: $'caf\xff' arrives as "caf\udcff".
    assert cli.main(["generate", "--model", str(chat_checkpoint), "--prompt", "caf\udcff"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid UTF-8" in err and "byte 0xff" in err, err


def test_chat_survives_a_line_that_is_not_utf8(chat_checkpoint):
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    result = subprocess.run(
        [sys.executable, "-m", "minillava", "chat", "--model", str(chat_checkpoint), "--max-new-tokens", "3"],
        input=b"caf\xff\nHi\n/quit\n",
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "error: " in out and "not valid UTF-8" in out and "byte 0xff" in out, out
    assert out.count("ASSISTANT: ") == 1  # the next message is answered


def test_a_bad_image_in_chat_is_dropped_with_its_error(chat_checkpoint, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    lines = iter([f"/image {bad}", "What is it?", "Hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--model", str(chat_checkpoint), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("error: ") == 1 and f"{bad}: not an image file" in out and "dropped" in out, out
    assert out.count("ASSISTANT: ") == 1  # "Hi" is answered; the bad image went with the failed message


def test_generation_settings_name_the_argument_or_the_file(chat_checkpoint, tmp_path, capsys):
    argv = ["generate", "--prompt", "Hi", "--max-new-tokens", "2"]
    assert cli.main([*argv, "--model", str(chat_checkpoint), "--seed", str(2**64)]) == 1
    assert "seed must be an integer in [0, 2**64) or None, got 18446744073709551616" in capsys.readouterr().err
    ckpt = Path(shutil.copytree(chat_checkpoint, tmp_path / "ckpt"))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "generation": {"eos_token_id": 2.0}}))
    assert cli.main([*argv, "--model", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert f"{ckpt / 'config.json'}: its generation defaults: eos_token_id must be an int" in err, err


@pytest.mark.parametrize("size", ["1e400GB", "inf", "nan", "-1MB", "0"])
def test_an_impossible_shard_size_is_one_line(chat_checkpoint, tmp_path, capsys, size):
    assert convert_main([str(chat_checkpoint), str(tmp_path / "out"), f"--max-shard-size={size}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --max-shard-size {size!r}") and err.count("\n") == 1, err


def interrupt_during_startup(argv: list[str], attempts: int = 3) -> subprocess.CompletedProcess:
    """Start a command and press Ctrl-C (SIGINT) while it is still importing torch.

    On a loaded machine this process may not be scheduled again until the command has already finished; such
    a try says nothing about Ctrl-C, so it is repeated (up to ``attempts`` times)."""
    for _ in range(attempts):
        result = _interrupt_once(argv)
        if result.returncode != 0:
            return result
    return result


def _interrupt_once(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="watches the process through /proc")
@pytest.mark.parametrize("command", ["minillava", "weights_convert"])
def test_ctrl_c_during_start_up_is_one_line(chat_checkpoint, tmp_path, command):
    args = {
        "minillava": ["generate", "--model", str(chat_checkpoint), "--prompt", "Hi"],
        "weights_convert": [str(chat_checkpoint), str(tmp_path / "out")],
    }[command]
    result = interrupt_during_startup([sys.executable, "-m", command, *args])
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "interrupted" in result.stderr
    assert not (tmp_path / "out").exists()
