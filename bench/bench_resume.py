"""Benchmark: a merge killed halfway and resumed redoes only the rest.

Uses a model and adapter built by ``bench_merge.py`` (``--workdir``/``--size`` as there). Runs, each
in a fresh process with the page cache dropped when possible: (1) an uninterrupted merge, (2) the
same merge killed right after half of its units are journaled (the ``STREAMMERGE_TEST_STOP_AFTER_UNITS``
hook dies with ``os._exit``, as a SIGKILL would), (3) ``--resume``. Prints the times, the units the
resumed run redid, and whether its output is byte-identical to the uninterrupted one.

Usage (from the repository root)::

    .venv/bin/python bench/bench_merge.py --size 1b --workdir /tmp/smb --keep --only copy   # builds the model once
    .venv/bin/python bench/bench_resume.py --workdir /tmp/smb --size 1b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def merge(base: Path, adapter: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[float, int, str]:
    cold = drop_caches()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "streammerge", "merge", str(base), str(adapter), "-o", str(out), "-q", *extra],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, proc.returncode, proc.stderr + ("" if cold else "\n(warm cache)")


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--size", default="1b")
    args = parser.parse_args()
    model = args.workdir / f"model-{args.size}"
    base, adapter = model / "base", model / "adapter"
    plan = json.loads(
        subprocess.run(
            [sys.executable, "-m", "streammerge", "plan", str(base), str(adapter), "-o", str(args.workdir / "x"), "--json"],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    units = len(plan["units"])
    half = units // 2
    outs = {name: args.workdir / f"resume-{name}" for name in ("full", "resumed")}
    for path in [*outs.values(), Path(str(outs["resumed"]) + ".partial")]:
        shutil.rmtree(path, ignore_errors=True)

    full_s, rc, err = merge(base, adapter, outs["full"])
    assert rc == 0, err
    killed_s, rc, _ = merge(base, adapter, outs["resumed"], env={"STREAMMERGE_TEST_STOP_AFTER_UNITS": str(half)})
    assert rc == 137, rc
    resumed_s, rc, err = merge(base, adapter, outs["resumed"], "--resume")
    assert rc == 0, err
    m = re.search(r"resumed: (\d+) of (\d+) units", err)
    done_before = int(m[1]) if m else 0
    same = digest(outs["full"]) == digest(outs["resumed"])
    print(f"## Resume after a kill at 50%: {args.size} ({units} units)\n")
    print(f"`python bench/bench_resume.py --workdir {args.workdir} --size {args.size}`\n")
    print("| run | wall s | units done by it |")
    print("|---|---:|---:|")
    print(f"| uninterrupted merge | {full_s:.2f} | {units} |")
    print(f"| killed after {half} units | {killed_s:.2f} | {half} |")
    print(f"| `--resume` | {resumed_s:.2f} | {units - done_before} |")
    print(f"\nresumed run: {done_before} of {units} units were already done; output byte-identical to the uninterrupted run: {same}")
    for path in outs.values():
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
