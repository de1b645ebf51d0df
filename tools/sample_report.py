"""Regenerate the README's "Sample report" block from a fresh run of the main job.

    .venv/bin/python tools/sample_report.py            # runs `python -m fxsketch`, rewrites README.md
    .venv/bin/python tools/sample_report.py --print    # only print the abridged report

The job prints the summary, the decisions and the measurement (the node table only with
``--nodes``); the block is the job's own output, unedited.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def run_main_job() -> tuple[str, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fxsketch"], check=True, capture_output=True, text=True).stdout
    return out, time.perf_counter() - start


def abridge(text: str, rows: int = 6) -> str:
    """The report as printed; a node table (``--nodes``), if any, cut to its first rows."""
    lines = text.splitlines()
    head = next((i for i, line in enumerate(lines) if line.startswith("node ") and " op " in line), None)
    if head is None:
        return text.rstrip("\n")
    last = next(i for i, line in enumerate(lines) if line.startswith("fc ") or line.startswith("unmodified model:"))
    return "\n".join(lines[:head + 2 + rows] + ["..."] + lines[last:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the abridged report, leave README.md alone")
    args = ap.parse_args()
    report, seconds = run_main_job()
    block = abridge(report)
    if args.print:
        print(block)
        return 0
    text = README.read_text()
    pattern = re.compile(r"(## Sample report\n\n.*?\n```\n)(.*?)(\n```\n)", re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no ``` block under '## Sample report'")
    text = pattern.sub(lambda m: m.group(1) + block + m.group(3), text, count=1)
    text = re.sub(r"\(The whole job took [0-9.]+ s on", f"(The whole job took {seconds:.0f} s on", text, count=1)
    README.write_text(text)
    print(f"README.md sample report rewritten ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
