"""Hugging Face hub ids (``llava-hf/llava-1.5-7b-hf``) wherever a checkpoint directory is taken.

:func:`resolve` turns a name that is not a local path but looks like ``org/name`` into the folder of its snapshot
in the hub cache, through ``huggingface_hub`` (an optional extra: ``pip install 'minillava[hub]'``): from the
cache alone when ``HF_HUB_OFFLINE=1`` (or the hub cannot be reached), downloading what is missing otherwise. The
cache is the hub client's own (``HF_HUB_CACHE``, ``HF_HOME``), so anything ``hf download`` or transformers fetched
is reused. Only what minillava reads is fetched: the JSON files (configs, index, tokenizer settings), the
tokenizer model, chat templates, and the safetensors weights, or the ``.bin`` ones when a repository has no
safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .extras import import_optional

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""``org/name`` as the hub spells repository ids (no leading dot or dash, one slash)."""
META_PATTERNS = ("*.json", "*.model", "*.jinja")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # in order of preference


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is no existing local path and reads as a hub repository id."""
    text = os.fspath(name)
    return not Path(text).exists() and HUB_ID.fullmatch(text) is not None and ".." not in text


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local directory for ``name_or_path``: the path itself, or the hub-cache snapshot of a hub id.

    Raises ``FileNotFoundError`` naming the repository and the cache when a hub id cannot be had (not cached while
    offline, or not on the hub), and :class:`~minillava.extras.MissingDependency` without ``huggingface_hub``.
    """
    if not is_hub_id(name_or_path):
        return Path(name_or_path)
    repo = os.fspath(name_or_path)
    hub = import_optional(
        "huggingface_hub", "hub", f"{repo} is not a local directory; reading it from the Hugging Face hub"
    )
    from huggingface_hub import constants, errors

    folder = None
    try:
        for weights in WEIGHT_PATTERNS:
            folder = Path(hub.snapshot_download(repo, allow_patterns=[*META_PATTERNS, weights]))
            if any(folder.rglob(weights)):
                break
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo}: no such local directory, and no such model on the Hugging Face hub (a private or gated one "
            "needs 'hf auth login' first)"
        ) from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise FileNotFoundError(
            f"{repo}: no such local directory, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) while "
            f"{why}; download it once with network access, or give a local directory"
        ) from None
    except errors.HfHubHTTPError as err:
        raise OSError(f"{repo}: the Hugging Face hub answered {err}") from None
    return folder
