"""Start-up time: the command line's ``--help``, ``import minillava``, ``Pipeline()`` on the bundled model, and a
whole ``minillava generate``; side by side with transformers loading the same model exported to llava-hf.

    .venv/bin/python benchmarks/bench_startup.py              # 7 rounds; prints medians and the load average
    .venv/bin/python benchmarks/bench_startup.py --rounds 15 --no-transformers
    git archive REV src | tar -x -C /tmp/old && .venv/bin/python benchmarks/bench_startup.py --against /tmp/old/src

Every measurement is a fresh interpreter (what a user pays), and the measurements alternate round by round so that
a busy machine slows them alike. In-process times (the ``Pipeline()`` call alone, transformers'
``from_pretrained``) are taken with ``time.perf_counter`` inside the child; process times are wall-clock from
spawn to exit. The child also reports how many modules it imported and whether the compiler stacks (sympy,
``torch._dynamo``, ``torch._inductor``) were among them. ``--against SRC`` measures another minillava source tree
(an earlier commit's ``src``) in the same rounds, alternating, and prints the ratios. Load averages are printed
before and after: on a shared machine read the medians together with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPILER_MODULES = ("sympy", "torch._dynamo", "torch._inductor")

_REPORT = f"""
import json, sys
print("@@" + json.dumps({{"t": t, "modules": len(sys.modules),
      "compiler": [m for m in {COMPILER_MODULES!r} if m in sys.modules]}}))
"""

SNIPPETS = {
    "import torch": "import time; s = time.perf_counter(); import torch; t = time.perf_counter() - s",
    "import minillava": "import time; s = time.perf_counter(); import minillava; t = time.perf_counter() - s",
    "Pipeline() call": (
        "import torch, minillava, time; s = time.perf_counter(); minillava.Pipeline(); t = time.perf_counter() - s"
    ),
}

TRANSFORMERS_SNIPPET = """
import time, torch, transformers
s = time.perf_counter()
transformers.AutoProcessor.from_pretrained(%r)
transformers.LlavaForConditionalGeneration.from_pretrained(%r)
t = time.perf_counter() - s
"""


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def run_snippet(code: str, src: str | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code + _REPORT], capture_output=True, text=True, check=True, env=_child_env(src)
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("@@"))
    return json.loads(line[2:])


def run_process(argv: list[str], src: str | None) -> dict:
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True, env=_child_env(src))
    return {"t": time.perf_counter() - start}


def _child_env(src: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    if src is not None:  # ahead of the installed (editable) minillava
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def export_bundled(tmp: Path) -> Path:
    from minillava.config import BUNDLED_MODEL
    from weights_convert.to_hf import export_hf

    out = tmp / "shapes-hf"
    export_hf(BUNDLED_MODEL, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="start-up times of the command line and Pipeline()")
    p.add_argument("--rounds", type=int, default=7, help="fresh processes per measurement")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    p.add_argument("--against", metavar="SRC", help="another minillava source tree to measure alongside")
    args = p.parse_args(argv)
    trees = {"this tree": None, **({"against": str(Path(args.against).resolve())} if args.against else {})}

    from minillava.config import BUNDLED_MODEL

    image = str(BUNDLED_MODEL / "example-1.png")
    processes = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "minillava --help": [sys.executable, "-m", "minillava", "--help"],
        "minillava generate (whole run)": [
            sys.executable, "-m", "minillava", "generate", "--image", image, "--prompt", "What is in the image?",
        ],
    }  # fmt: skip
    snippets = dict(SNIPPETS)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_transformers:
            try:
                exported = export_bundled(Path(tmp))
                snippets["transformers from_pretrained"] = TRANSFORMERS_SNIPPET % (str(exported), str(exported))
            except ImportError:
                print("transformers side skipped: transformers is not installed")
        print(f"load average before: {load_average()}")
        results: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.rounds):
            for name, argv_ in processes.items():
                for tree, src in trees.items():
                    results.setdefault((name, tree), []).append(run_process(argv_, src))
            for name, code in snippets.items():
                for tree, src in trees.items():
                    if name.startswith("transformers") and src is not None:
                        continue
                    results.setdefault((name, tree), []).append(run_snippet(code, src))
        print(f"load average after:  {load_average()}")
    print(f"\nmedian of {args.rounds} fresh processes (min in brackets), {os.cpu_count()} cores")
    for (name, tree), runs in results.items():
        times = [r["t"] for r in runs]
        extra = ""
        if "modules" in runs[-1]:
            compiler = ", ".join(runs[-1]["compiler"]) or "none"
            extra = f"   {runs[-1]['modules']} modules; compiler stacks: {compiler}"
        if tree != "this tree":
            ours = statistics.median(r["t"] for r in results[(name, "this tree")])
            extra = f"   this tree / against: {ours / statistics.median(times):.2f}x" + extra
        label = f"{name} ({tree})" if len(trees) > 1 else name
        print(f"  {label:<46} {statistics.median(times):6.3f} s  [{min(times):.3f}]{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
