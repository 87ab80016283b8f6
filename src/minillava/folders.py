"""Output folders: apart from what they are made from, whole or not at all, with the permissions the umask gives.

Every checkpoint minillava writes (conversion, export, ``save``, training) is built in a hidden temporary folder
beside its destination and renamed into place when complete. Each such folder holds a marker naming the process
that writes it, so that a later run removes what a killed one left, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_MARKER = ".minillava-incomplete"
"""The file in every temporary folder minillava makes: the process that writes it (its host and pid)."""


def refuse_overlap(dst: Path, source: Path, dst_flag: str = "", source_flag: str = "the source ") -> None:
    """Raise ``ValueError`` when ``dst`` is, contains or lies inside ``source``: writing there could replace or
    delete the source, so no flag overrides it."""
    d, s = Path(dst).resolve(), Path(source).resolve()
    if d == s:
        relation = "is the same folder as"
    elif s in d.parents:
        relation = "lies inside"
    elif d in s.parents:
        relation = "contains"
    else:
        return
    raise ValueError(
        f"{dst_flag}{dst} {relation} {source_flag}{source}: writing there could replace or delete what is read, so "
        f"it is refused even with --force; choose a destination outside {source}"
    )


def _umask() -> int:
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _is_stale(folder: Path) -> bool:
    """Whether ``folder`` is a temporary folder of a process of this machine that no longer runs."""
    try:
        owner = json.loads((folder / TEMP_MARKER).read_text())
    except (OSError, ValueError):
        return False  # not ours, or unreadable: leave it
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists (another user's)
    return False


def remove_stale_folders(parent: Path, name: str | None = None) -> None:
    """Remove the temporary folders killed runs left in ``parent`` (for the destination ``name``, or any)."""
    prefix = "." if name is None else f".{name}."
    try:
        found = [p for p in Path(parent).iterdir() if p.name.startswith(prefix) and p.name.endswith((".tmp", ".old"))]
    except OSError:
        return
    for folder in found:
        if folder.is_dir() and not folder.is_symlink() and _is_stale(folder):
            shutil.rmtree(folder, ignore_errors=True)


def make_temp_folder(dst: Path, suffix: str = ".tmp") -> Path:
    """A new hidden folder ``.NAME.XXXXXXXX.tmp`` beside ``dst``, marked as this process's and with the permissions
    the umask gives; killed runs' folders for ``dst`` are removed first."""
    remove_stale_folders(dst.parent, dst.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=suffix, dir=dst.parent))
    except OSError as err:
        reason = err.strerror or err
        raise OSError(f"{dst}: cannot create it there ({reason}); choose a folder you can write to") from None
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only
        (tmp / TEMP_MARKER).write_text(json.dumps(_owner()))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


@contextmanager
def temporary_folder(dst: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield :func:`make_temp_folder`'s folder; it is removed when the block ends, however it ends."""
    tmp = make_temp_folder(dst, suffix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_directory(
    dst: str | os.PathLike, force: bool = False, sources: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst`` that becomes ``dst`` only if the block succeeds.

    A ``dst`` that is, contains or lies inside one of ``sources`` is refused, ``force`` or not. A non-empty ``dst``
    is refused unless ``force``; then it is replaced only after the new one is complete.
    """
    dst = Path(dst)
    for source in sources:
        refuse_overlap(dst, Path(source))
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise FileExistsError(f"{dst} exists and is not empty; choose another destination or pass --force")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"{dst}: cannot create its folder ({err.strerror or err})") from None
    with temporary_folder(dst) as tmp:
        yield tmp
        (tmp / TEMP_MARKER).unlink()
        if not dst.exists():
            os.replace(tmp, dst)
            return
        old = tmp.with_suffix(".old")
        os.replace(dst, old)
        os.replace(tmp, dst)
        if old.is_dir():
            (old / TEMP_MARKER).write_text(json.dumps(_owner()))  # a kill while deleting it leaves it removable
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
