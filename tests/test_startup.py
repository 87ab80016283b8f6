"""Start-up stays light: the command line parses (and answers ``--help``) without importing torch, and a model
loads without pulling in torch's compiler stack (dynamo, inductor, sympy: about 800 modules). The times themselves
are measured by ``benchmarks/bench_startup.py``, not here."""

from __future__ import annotations

import json
import subprocess
import sys

COMPILER_STACK = ("sympy", "torch._dynamo", "torch._inductor")


def test_command_line_and_pipeline_import_only_what_they_need():
    code = f"""
import json, sys
import minillava, minillava.cli
minillava.cli.build_parser().format_help()
after_help = "torch" in sys.modules
minillava.Pipeline()
print(json.dumps({{"torch_after_help": after_help,
                   "compiler_after_load": [m for m in {COMPILER_STACK!r} if m in sys.modules]}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"torch_after_help": False, "compiler_after_load": []}
