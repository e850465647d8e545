"""How fast this machine reads a model's safetensors, and at what CPU cost, three ways.

* ``direct``  -- ``preadv`` on an ``O_DIRECT`` descriptor into one reused page-aligned buffer
  (what ``streammerge merge --read direct``, the default where allowed, does);
* ``buffered`` -- ``read`` through the page cache into one reused buffer (what ``cat`` does);
* ``mmap``    -- map the file, ``MADV_POPULATE_READ`` each chunk, then touch one byte per page
  (what ``--read mmap`` costs before any merging).

It drops the page cache first when it can (root), and prints GB/s with the process's user and
system CPU seconds. On the benchmark VM the buffered and mmap ways spent ~5 us of CPU per 4 KiB
page that the disk had filled (docs/benchmarks.md); the direct way spends almost none.

Usage::

    python bench/read_speed.py /tmp/smb3/model-3b/base --mode direct --chunk-mib 64
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path

ALIGN = 4096


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def read_direct(path: Path, buffer: mmap.mmap) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    total = 0
    try:
        while n := os.preadv(fd, [buffer], total):  # offsets stay aligned until the short last read
            total += n
            if n < len(buffer):
                break
    finally:
        os.close(fd)
    return total


def read_buffered(path: Path, buffer: mmap.mmap) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def read_mmap(path: Path, chunk: int) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        populate = getattr(mmap, "MADV_POPULATE_READ", None)
        for start in range(0, size, chunk):
            n = min(chunk, size - start)
            if populate is not None:
                mm.madvise(populate, start, n)
            sum(mm[start : start + n : mmap.PAGESIZE])  # one byte per page: the first CPU touch
    return size


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a model folder (its *.safetensors are read)")
    p.add_argument("--mode", choices=("direct", "buffered", "mmap"), default="direct")
    p.add_argument("--chunk-mib", type=int, default=64, help="bytes per read (default 64)")
    args = p.parse_args(argv)
    files = sorted(args.folder.glob("*.safetensors"))
    if not files:
        print(f"{args.folder}: no *.safetensors files", file=sys.stderr)
        return 2
    chunk = args.chunk_mib * 2**20
    cold = drop_caches()
    buffer = mmap.mmap(-1, chunk)
    before, start = os.times(), time.perf_counter()
    total = 0
    for path in files:
        if args.mode == "direct":
            total += read_direct(path, buffer)
        elif args.mode == "buffered":
            total += read_buffered(path, buffer)
        else:
            total += read_mmap(path, chunk)
    seconds, after = time.perf_counter() - start, os.times()
    print(
        f"{args.mode}: {total / 1e9:.2f} GB in {seconds:.2f} s = {total / seconds / 1e9:.2f} GB/s; "
        f"CPU user {after.user - before.user:.2f} s, system {after.system - before.system:.2f} s; "
        f"page cache {'dropped first (cold)' if cold else 'NOT dropped (warm, not root)'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
