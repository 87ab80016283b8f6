"""``python -m weights_convert SRC DST``: convert a LLaVA checkpoint into the minillava layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .convert import convert
from .hf_llava import HfLlavaSource, read_json

SOURCES = (HfLlavaSource,)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def detect(src: Path):
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json; expected a llava-hf or original LLaVA checkpoint directory")
    config = read_json(config_path)
    for source in SOURCES:
        if source.matches(src, config):
            return source(src)
    raise ValueError(
        f"{src}: unknown checkpoint layout (model_type={config.get('model_type')!r}); "
        f"supported: {', '.join(s.name for s in SOURCES)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__)
    parser.add_argument("src", type=Path, help="source checkpoint directory")
    parser.add_argument("dst", type=Path, help="destination directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the source dtype)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 500MB (default 2GB)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST once the new one is complete")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        source = detect(args.src)
        convert(
            source,
            args.dst,
            dtype=DTYPES.get(args.dtype),
            max_shard_bytes=parse_size(args.max_shard_size),
            force=args.force,
        )
    except (OSError, ValueError, KeyError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} (from {source.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
