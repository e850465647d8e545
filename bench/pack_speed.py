"""Benchmark: ``streammerge pack`` against plain zstd and against ZipNN, on the same files, in one run.

Builds (or reuses, in ``--workdir``) bench_merge.py's random Llama-shaped bf16 model and LoRA adapter,
and its pre-quantized NF4 base, merges both bases with streammerge (bf16 outputs: "merged from bf16"
and "merged from 4-bit"), then packs each output's ``*.safetensors`` files three ways, each with the
same zstd level and thread count, and unpacks them again (checking the bytes):

* ``streammerge`` -- :func:`streammerge.pack.pack` / :func:`~streammerge.pack.unpack` (byte groups, zstd per chunk);
* ``zstd``        -- ``zstandard.ZstdCompressor(level, threads=N).copy_stream`` of each file (zstd's own
  multi-threading), ``ZstdDecompressor().copy_stream`` back;
* ``zipnn``       -- ``zipnn.ZipNN(method="zstd", bytearray_dtype="bfloat16", threads=N, zstd_level=level)``
  ``.compress(file bytes)`` / ``.decompress`` (whole files in memory: its byte API).

Files are in the page cache (each is read once first), so the figures are the CPU's, not the disk's.
Ratio = raw bytes / packed bytes; speeds are raw MB per second.

Usage (from the repository root; ZipNN comes with ``.venv/bin/pip install -e '.[bench]'``)::

    .venv/bin/python bench/pack_speed.py --size 0.1b --workdir /tmp/smb
    .venv/bin/python bench/pack_speed.py --size 1b --workdir /tmp/smb --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_merge


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def same_bytes(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def bench_streammerge(model: Path, work: Path, level: int, threads: int) -> tuple[int, float, float]:
    from streammerge.pack import pack, unpack

    packed, again = work / "sm.smpack", work / "sm.again"
    t_pack, report = timed(lambda: pack(model, packed, level=level, threads=threads, overwrite=True))
    t_unpack, _ = timed(lambda: unpack(packed, again, threads=threads, overwrite=True))
    assert all(same_bytes(f, again / f.name) for f in files_of(model))
    shutil.rmtree(packed)
    shutil.rmtree(again)
    return report.packed_bytes, t_pack, t_unpack


def bench_zstd(model: Path, work: Path, level: int, threads: int) -> tuple[int, float, float]:
    import zstandard

    packed_total = 0
    t_pack = t_unpack = 0.0
    for f in files_of(model):
        z, back = work / (f.name + ".zst"), work / f.name

        def compress(f: Path = f, z: Path = z) -> None:
            with open(f, "rb") as src, open(z, "wb") as dst:
                zstandard.ZstdCompressor(level=level, threads=threads).copy_stream(src, dst)

        def decompress(z: Path = z, back: Path = back) -> None:
            with open(z, "rb") as src, open(back, "wb") as dst:
                zstandard.ZstdDecompressor().copy_stream(src, dst)

        t_pack += timed(compress)[0]
        t_unpack += timed(decompress)[0]
        packed_total += z.stat().st_size
        assert same_bytes(f, back)
        z.unlink()
        back.unlink()
    return packed_total, t_pack, t_unpack


def bench_zipnn(model: Path, work: Path, level: int, threads: int) -> tuple[int, float, float]:
    from zipnn import ZipNN

    packed_total = 0
    t_pack = t_unpack = 0.0
    for f in files_of(model):
        zpn = ZipNN(method="zstd", input_format="byte", bytearray_dtype="bfloat16", threads=threads, zstd_level=level)
        z = work / (f.name + ".znn")

        def compress(f: Path = f, z: Path = z, zpn: Any = zpn) -> None:
            z.write_bytes(zpn.compress(f.read_bytes()))

        def decompress(z: Path = z, zpn: Any = zpn) -> bytes:
            return bytes(zpn.decompress(z.read_bytes()))

        t_pack += timed(compress)[0]
        dt, back = timed(decompress)
        t_unpack += dt
        packed_total += z.stat().st_size
        assert back == f.read_bytes()
        z.unlink()
    return packed_total, t_pack, t_unpack


METHODS: dict[str, Callable[[Path, Path, int, int], tuple[int, float, float]]] = {
    "streammerge": bench_streammerge,
    "zstd": bench_zstd,
    "zipnn": bench_zipnn,
}


def merged_model(python: str, base: Path, adapter: Path, out: Path) -> Path:
    if not (out / "streammerge-manifest.json").exists():
        cmd = [python, "-m", "streammerge", "merge", str(base), str(adapter), "-o", str(out), "--quiet", "--overwrite"]
        subprocess.run(cmd, check=True, env=bench_merge.child_env())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.1b", choices=sorted(bench_merge.SIZES))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    ap.add_argument("--only", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    python = sys.executable
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="smpack-"))
    model_dir = workdir / f"model-{args.size}"
    base, adapter, _ = bench_merge.ensure_model(args.size, model_dir, python)
    nf4, _ = bench_merge.ensure_quantized(args.size, "nf4", model_dir, base, python)
    models = {
        "merged from bf16": merged_model(python, base, adapter, model_dir / "merged-bf16"),
        "merged from 4-bit": merged_model(python, nf4, adapter, model_dir / "merged-nf4"),
    }
    scratch = workdir / "pack-scratch"
    scratch.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    for label, model in models.items():
        raw = sum(f.stat().st_size for f in files_of(model))
        for f in files_of(model):
            f.read_bytes()  # into the page cache: every method reads it from memory
        for method in args.only.split(","):
            runs = [METHODS[method](model, scratch, args.level, args.threads) for _ in range(args.repeat)]
            packed = runs[0][0]
            t_pack = statistics.median(r[1] for r in runs)
            t_unpack = statistics.median(r[2] for r in runs)
            rows.append(
                {
                    "model": label,
                    "method": method,
                    "raw_mb": raw / 1e6,
                    "packed_mb": packed / 1e6,
                    "ratio": raw / packed,
                    "pack_mb_s": raw / 1e6 / t_pack,
                    "unpack_mb_s": raw / 1e6 / t_unpack,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    info = bench_merge.machine_info()
    import zstandard

    versions = {"zstandard": zstandard.__version__}
    try:
        from importlib import metadata

        versions["zipnn"] = metadata.version("zipnn")
    except Exception:
        versions["zipnn"] = "not installed"
    print()
    print(
        f"{args.size} model, zstd level {args.level}, {args.threads} threads, median of {args.repeat}; "
        f"{info['cpu']}, {info['usable_cores']} cores; zstandard {versions['zstandard']}, zipnn {versions['zipnn']}"
    )
    print()
    print("| model | method | raw MB | packed MB | ratio | pack MB/s | unpack MB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['method']} | {r['raw_mb']:.0f} | {r['packed_mb']:.0f} | {r['ratio']:.3f} | "
            f"{r['pack_mb_s']:.0f} | {r['unpack_mb_s']:.0f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "machine": info,
                    "versions": versions,
                    "args": vars(args) | {"workdir": str(workdir), "json": str(args.json)},
                },
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
