"""Nothing the user had is lost: a destination never touches its source, outputs appear whole or not at all, a
killed run's temporary folders are cleaned up by the next one, and outputs get the permissions the umask says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minillava
from minillava.checkpoint import CARRIED_FILES
from minillava.folders import atomic_directory
from minillava.train import train
from tests.tiny_models import train_config
from weights_convert.__main__ import main as convert_main


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def models(chat_checkpoint, tmp_path) -> Path:
    """``models/src`` (a checkpoint) beside ``models/notes.txt``, a file of the user's."""
    root = tmp_path / "models"
    shutil.copytree(chat_checkpoint, root / "src")
    (root / "notes.txt").write_text("the user's")
    return root


@pytest.mark.parametrize("export", [False, True], ids=["convert", "export"])
@pytest.mark.parametrize("where", ["the source", "its parent", "inside it"])
def test_a_destination_never_touches_its_source(models, capsys, where, export):
    src = models / "src"
    dst = {"the source": src, "its parent": models, "inside it": src / "converted"}[where]
    before = snapshot(models)
    for force in ([], ["--force"]):
        assert convert_main([*(["--to", "hf"] if export else []), str(src), str(dst), *force]) == 1
        err = capsys.readouterr().err
        assert "source" in err and str(src) in err, err
        assert "pass --force" not in err  # never recommended: it would not help, and must not
    assert snapshot(models) == before


def kill_inside_atomic_directory(dst: Path) -> None:
    """A real process that dies (SIGKILL) halfway through writing ``dst``, as a killed conversion does."""
    code = (
        "import os, signal, sys\n"
        "from minillava.folders import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(bytes(100_000))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(dst)], capture_output=True, timeout=300)
    assert result.returncode == -9, result.stderr


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(chat_checkpoint, tmp_path):
    dst = tmp_path / "out"
    kill_inside_atomic_directory(dst)
    left = hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.") and left[0].endswith(".tmp")
    # A folder of the same shape made by someone else (no marker), and one of a live run (this process), stay.
    (tmp_path / ".out.users.tmp").mkdir()

    class GiveUp(Exception):
        pass

    with pytest.raises(GiveUp), atomic_directory(dst) as live:
        assert convert_main([str(chat_checkpoint), str(dst)]) == 0
        assert hidden(tmp_path) == sorted([".out.users.tmp", live.name])
        raise GiveUp  # the live run ends without writing
    assert hidden(tmp_path) == [".out.users.tmp"]
    assert minillava.load(dst).config.text.vocab_size > 0


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """The permission bits of ``root`` and everything it holds but the carried files (copied with their own)."""
    paths = [root, *(p for p in root.rglob("*") if p.name not in CARRIED_FILES)]
    return {str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in paths}


def test_outputs_follow_the_umask(chat_checkpoint, train_setup, tmp_path, umask_027):
    assert convert_main([str(chat_checkpoint), str(tmp_path / "converted")]) == 0
    train(train_config(train_setup, tmp_path / "trained", max_steps=1, save_every=1))
    for root in (tmp_path / "converted", tmp_path / "trained"):
        found = modes(root)
        expected = {path: 0o750 if (tmp_path / path).is_dir() else 0o640 for path in found}
        assert found == expected
    assert (tmp_path / "trained" / "checkpoint-1" / "optimizer.safetensors").is_file()


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder in which nothing can be created: read-only, or (for root, whom permissions do not stop) /proc/self."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        return Path("/proc/self")
    return folder


def test_an_unwritable_destination_is_named_not_its_temporary_folder(chat_checkpoint, tmp_path, capsys):
    dst = unwritable_folder(tmp_path) / "out"
    assert convert_main([str(chat_checkpoint), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {dst}: cannot create") and ".out." not in err, err
