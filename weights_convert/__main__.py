"""Convert LLaVA checkpoints into the minillava layout, or export a minillava checkpoint back to llava-hf.

python -m weights_convert SRC DST [--vision-tower CLIP_DIR]   llava-hf or original LLaVA -> minillava
python -m weights_convert --to hf SRC DST [--pad-vocab]       minillava -> llava-hf

SRC (and CLIP_DIR) may be a Hugging Face hub id such as llava-hf/llava-1.5-7b-hf, read from the hub cache
(downloaded when online). "minillava convert" is the same command.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from minillava.config import DTYPE_NAMES

DEFAULT_SHARD_SIZE = "2GB"


def parse_size(text: str) -> int:
    """``500MB``, ``2GB``, ``1.5GiB`` or a plain byte count -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    try:
        for unit, factor in units.items():
            if upper.endswith(unit):
                number = float(upper[: -len(unit)]) * factor
                break
        else:
            number = float(int(upper))
        if not math.isfinite(number):
            raise ValueError
        value = int(number)
    except ValueError:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 500MB or 2GB") from None
    if value <= 0:
        raise ValueError(f"--max-shard-size {text!r}: must be positive")
    return value


def build_parser(prog: str = "python -m weights_convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="source checkpoint directory, or a Hugging Face hub id")
    parser.add_argument("dst", type=Path, help="destination directory (must not exist or be empty, unless --force)")
    parser.add_argument("--to", choices=("minillava", "hf"), default="minillava", help="output layout")
    parser.add_argument(
        "--vision-tower",
        type=Path,
        metavar="CLIP_DIR",
        help="CLIP checkpoint directory (or hub id) for original LLaVA weights without a tower, e.g. "
        "openai/clip-vit-large-patch14-336",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="cast floating weights (default: the source's)")
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="write the decoder's linear layers as int8 (per-row scales) or int4 (groups of 32) weights",
    )
    parser.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="largest output shard (default 2GB)")
    parser.add_argument(
        "--pad-vocab",
        action="store_true",
        help="with --to hf: append embedding rows so the image placeholder id is inside the vocabulary",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write weights holding NaN or infinite values (refused by default, naming the tensor)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty DST once the new one is complete (never the source or a folder around it)",
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m weights_convert") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        origin = _run(args)
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, ImportError) as err:
        if args.verbose:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({args.to} layout, from {origin})")
    from .convert import check_tokenizer

    if not check_tokenizer(args.dst):
        print(
            f"note: {args.src} has no tokenizer files; copy tokenizer.model (or tokenizer.json) and its JSON files "
            f"into {args.dst} before generating"
        )
    return 0


def _run(args: argparse.Namespace) -> str:
    """Convert or export as ``args`` say; returns the source layout's name. Imported here, not at the top, so that
    Ctrl-C while torch loads is handled like any other moment."""
    from minillava.hub import resolve
    from minillava.layouts import detect
    from minillava.progress import ProgressBar
    from minillava.safetensors_io import DTYPES

    from .convert import convert
    from .to_hf import export_hf

    bar = ProgressBar(enabled=sys.stderr.isatty())

    def progress(i: int, n: int, path: Path) -> None:
        bar.update(i, n, "done" if i == n else path.name[:60])

    max_shard_bytes = parse_size(args.max_shard_size)
    dtype = DTYPES.get(args.dtype)
    if args.to == "hf":
        if args.vision_tower is not None:
            raise ValueError("--vision-tower is for converting original LLaVA checkpoints, not for --to hf")
        if args.quantize is not None:
            raise ValueError("--quantize writes minillava checkpoints; llava-hf export needs full precision")
        src = resolve(args.src)
        export_hf(src, args.dst, dtype, max_shard_bytes, args.force, args.pad_vocab, progress, args.allow_nonfinite)
        return "minillava"
    if args.pad_vocab:
        raise ValueError("--pad-vocab only applies to --to hf")
    tower = None if args.vision_tower is None else resolve(args.vision_tower)
    source = detect(resolve(args.src), vision_tower=tower)
    convert(
        source, args.dst, dtype, max_shard_bytes, args.force, progress, args.allow_nonfinite, quantize=args.quantize
    )
    return source.name


if __name__ == "__main__":
    sys.exit(main())
