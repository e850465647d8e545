"""Benchmark: streammerge straight to GGUF against merge-to-safetensors + llama.cpp's convert_hf_to_gguf.py, in one run.

Builds (or reuses, in ``--workdir``) bench_merge.py's random Llama-shaped bf16 model and rank-16 LoRA,
gives it a small byte-level BPE tokenizer (the model's vocabulary is padded with ``[PADn]`` tokens,
as the converter pads), then, each in fresh subprocesses:

* ``streammerge-gguf``: ``python -m streammerge merge BASE LORA -o OUT/model.gguf --outtype T --gguf-pre llama-bpe``;
* ``two-step``: ``python -m streammerge merge BASE LORA -o OUT/two-step/NAME`` (safetensors, the folder named
  like the base's, as the converter names the model after it), then
  ``convert_hf_to_gguf.py OUT/two-step/NAME --outtype T --outfile OUT/conv.gguf`` (llama.cpp's converter from
  the llama-cpp-python sdist ``make install`` unpacks into ``.cache/sdist/llama.cpp``, run through
  ``tests/gguf_convert.py``, which only makes its BPE pre-tokenizer lookup answer ``llama-bpe``).

Reported per method: wall time (and the ``sync`` after it), peak RSS of the largest child
(``ru_maxrss``), and the disk it needs at its peak (the two-step way holds the merged safetensors
copy and the GGUF at once). The two GGUF files are compared byte for byte. The page cache is
dropped before each child when run as root (cold), else warm.

Usage (from the repository root)::

    .venv/bin/python bench/gguf_speed.py --size 0.1b --workdir /tmp/smb --outtype bf16
    .venv/bin/python bench/gguf_speed.py --size 0.1b --workdir /tmp/smb --outtype q8_0 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_merge

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP = REPO / ".cache" / "sdist" / "llama.cpp"
PRE = "llama-bpe"


def gguf_base(base: Path, dst: Path, python: str) -> Path:
    """The benchmark base with a tokenizer: its files hard-linked (or copied), a tokenizer trained beside them."""
    if (dst / "tokenizer.json").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in base.iterdir():
        try:
            (dst / f.name).hardlink_to(f)
        except OSError:
            shutil.copy(f, dst / f.name)
    code = "import sys; from pathlib import Path; from tests.test_gguf import bpe_tokenizer; bpe_tokenizer(Path(sys.argv[1]))"
    subprocess.run([python, "-c", code, str(dst)], check=True, env=bench_merge.child_env(), cwd=REPO)
    return dst


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_once(python: str, base: Path, adapter: Path, work: Path, outtype: str, cold: bool) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sm = [python, "-m", "streammerge", "merge", str(base), str(adapter), "--quiet", "--overwrite"]
    bench_merge.prepare_cache(cold)
    one = bench_merge.measure([*sm, "-o", str(work / "model.gguf"), "--outtype", outtype, "--gguf-pre", PRE], work / "gguf.log")
    one_disk = folder_bytes(work / "model.gguf")
    # the merged folder is named like the base: the converter derives general.name from the folder's name
    merged = work / "two-step" / base.name
    merged.parent.mkdir()
    bench_merge.prepare_cache(cold)
    merge = bench_merge.measure([*sm, "-o", str(merged)], work / "merge.log")
    bench_merge.prepare_cache(cold)
    conv_cmd = [python, str(REPO / "tests" / "gguf_convert.py"), str(LLAMA_CPP), PRE, str(merged), "--outtype", outtype,
                "--outfile", str(work / "conv.gguf")]  # fmt: skip
    conv = bench_merge.measure(conv_cmd, work / "convert.log")
    two_disk = folder_bytes(merged) + folder_bytes(work / "conv.gguf")
    for m, log in ((one, "gguf.log"), (merge, "merge.log"), (conv, "convert.log")):
        if m.returncode != 0:
            raise SystemExit(f"a child failed ({log}):\n{bench_merge.log_tail(work / log)}")
    same = (work / "model.gguf").read_bytes() == (work / "conv.gguf").read_bytes()
    return {
        "streammerge-gguf": {"wall_s": one.wall_s, "sync_s": one.sync_s, "peak_rss_mb": one.peak_rss_mb, "disk_bytes": one_disk},
        "two-step": {
            "wall_s": merge.wall_s + conv.wall_s,
            "sync_s": merge.sync_s + conv.sync_s,
            "peak_rss_mb": max(merge.peak_rss_mb, conv.peak_rss_mb),
            "disk_bytes": two_disk,
            "merge_s": merge.wall_s,
            "convert_s": conv.wall_s,
            "merge_rss_mb": merge.peak_rss_mb,
            "convert_rss_mb": conv.peak_rss_mb,
        },
        "identical": same,
        "gguf_bytes": one_disk,
    }


def render(runs: list[dict[str, Any]], args: argparse.Namespace, cold: bool) -> str:
    def med(method: str, key: str) -> float:
        return statistics.median(r[method][key] for r in runs)

    lines = [
        f"GGUF {args.outtype}, size {args.size}, {len(runs)} run(s), {'cold' if cold else 'warm'} page cache; "
        f"files identical: {all(r['identical'] for r in runs)}; GGUF {runs[0]['gguf_bytes'] / 1e6:.1f} MB",
        "",
        "| method | wall s (median) | + sync s | peak RSS MiB | disk at peak MB |",
        "|---|---|---|---|---|",
    ]
    for method in ("streammerge-gguf", "two-step"):
        lines.append(
            f"| {method} | {med(method, 'wall_s'):.1f} | {med(method, 'sync_s'):.1f} | {med(method, 'peak_rss_mb'):.0f} | "
            f"{med(method, 'disk_bytes') / 1e6:.1f} |"
        )
    lines.append("")
    lines.append(
        f"two-step = merge {med('two-step', 'merge_s'):.1f} s ({med('two-step', 'merge_rss_mb'):.0f} MiB) + "
        f"convert {med('two-step', 'convert_s'):.1f} s ({med('two-step', 'convert_rss_mb'):.0f} MiB)"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.1b", choices=sorted(bench_merge.SIZES))
    ap.add_argument("--outtype", default="bf16", choices=["bf16", "f16", "q8_0"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--warm", action="store_true", help="keep the page cache (default: dropped when root)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{LLAMA_CPP}: no convert_hf_to_gguf.py; run make install")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="smgguf-"))
    python = sys.executable
    base, adapter, _ = bench_merge.ensure_model(args.size, workdir / f"model-{args.size}", python)
    base = gguf_base(base, workdir / f"model-{args.size}" / "base-gguf", python)
    cold = not args.warm and bench_merge.can_drop_caches()
    runs = [run_once(python, base, adapter, workdir / "gguf-run", args.outtype, cold) for _ in range(args.repeat)]
    print(render(runs, args, cold))
    print()
    print("machine:", json.dumps(bench_merge.machine_info()))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "machine": bench_merge.machine_info(), "args": vars(args)}, default=str, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
