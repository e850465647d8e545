"""Benchmark: streammerge vs transformers+PEFT vs a plain file copy.

Builds (once, cached in the work folder) a randomly initialised Llama-shaped bf16 model and
a rank-16 LoRA adapter on every linear layer (q, k, v, o, gate, up, down) with non-zero
``lora_B``, then times each method in its own fresh subprocess and records its peak RSS:

* ``copy``        -- ``shutil.copyfile`` of the base's ``*.safetensors`` files (the disk floor);
* ``copy-direct`` -- the same bytes read and written with ``O_DIRECT`` (see below);
* ``streammerge`` -- ``python -m streammerge merge BASE ADAPTER -o OUT --quiet --overwrite``
  (its default ``--read auto``: base weights read with ``O_DIRECT`` from a cold cache, mapped from a warm one);
* ``streammerge-mmap`` -- the same with ``--read mmap`` (base weights read through the page cache);
* ``peft``        -- ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained``
  + ``merge_and_unload()`` + ``save_pretrained(max_shard_size="5GB")``.

With ``--quant nf4`` the base is a *pre-quantized* bitsandbytes 4-bit checkpoint of the same
model (NF4, double quant, compute dtype bf16), built once from the bf16 one by transformers on
CPU and cached next to it; the adapter is the same. Then:

* ``copy``        -- copies the 4-bit base's bytes: the floor for *reading* the input;
* ``copy-bf16``   -- copies the bf16 base's bytes, the size of the 16-bit output: the floor
  for *writing* it;
* ``copy-direct`` -- copies the bf16 base's bytes, reading and writing (on a second thread) with
  ``O_DIRECT`` as streammerge does (any ``--quant``): the disk without the page cache;
* ``streammerge`` -- the same command on the 4-bit base (output bf16, its default there);
* ``peft``        -- ``from_pretrained(4-bit, device_map="cpu")`` + ``model.dequantize()``
  + ``PeftModel.from_pretrained`` + ``merge_and_unload()`` + ``save_pretrained``.

They run in ``--repeat`` rounds, each running every method once in the order copy, copy-bf16,
copy-direct, streammerge, streammerge-mmap, peft, so that this kind of shared disk's drift over minutes affects every method
alike; the table shows medians. Peak RSS is the child's ``ru_maxrss`` as returned by ``os.wait4`` for that one child,
so measurements never leak into each other. Before every measurement the script runs
``sync`` and, when ``/proc/sys/vm/drop_caches`` is writable (root), drops the page cache
("cold"); otherwise the cache is warm and the report says so. "sync s" is the time the
``sync`` right after a run took to flush the output that run left dirty; it is not part of
"wall s".

Usage (from the repository root)::

    .venv/bin/python bench/bench_merge.py --size 0.1b
    .venv/bin/python bench/bench_merge.py --size 1b --repeat 3 --workdir /tmp/smb --keep
    .venv/bin/python bench/bench_merge.py --size 3b --only copy,streammerge --json out.json
    .venv/bin/python bench/bench_merge.py --size 1b --quant nf4 --workdir /tmp/smb --keep
    python3 bench/bench_merge.py --size 3b --only copy,streammerge --device cuda --vram-budget 2GiB

Without ``--workdir`` a temporary folder under /tmp is used and removed at the end unless
``--keep``. With ``--workdir`` only what this script creates inside it is removed (again
unless ``--keep``); a model/adapter (and 4-bit base) already built there for the same ``--size``
is reused, so a ``--quant nf4`` run in the work folder of a bf16 run only builds the 4-bit base.
When both the streammerge and the PEFT outputs exist, a few merged tensors are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("copy", "copy-bf16", "copy-direct", "streammerge", "streammerge-mmap", "peft")
QUANTS = ("none", "nf4", "fp8")
#: Methods that only make sense with a quantized base (with --quant none the base *is* bf16).
QUANT_ONLY = ("copy-bf16",)
TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
LORA_RANK = 16
LORA_ALPHA = 32
SEED = 1234
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

# Llama shapes per --size. Parameter counts (untied lm_head, vocab 32000):
# 0.1b ~ 0.12B (0.25 GB bf16), 1b ~ 1.10B (2.2 GB, TinyLlama), 3b ~ 3.02B (6.0 GB).
SIZES: dict[str, dict[str, int]] = {
    "0.1b": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
    },
}


@dataclass
class Measurement:
    """One timed child run."""

    wall_s: float
    sync_s: float
    peak_rss_mb: float
    returncode: int

    @property
    def total_s(self) -> float:
        """Wall time plus the time to flush what the run left dirty."""
        return self.wall_s + self.sync_s


@dataclass
class MethodResult:
    """All runs of one method plus the medians reported in the table."""

    method: str
    runs: list[Measurement] = field(default_factory=list)
    error: str | None = None
    out_mb: float | None = None  # size of the output's *.safetensors after the last run

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(run, attr) for run in self.runs)


# --------------------------------------------------------------------------- child work
# These run inside fresh subprocesses (``bench_merge.py _child KIND ...``); heavy imports
# stay inside them so the parent and the copy child never load torch.


def child_build(size: str, base_dir: Path, adapter_dir: Path) -> None:
    """Build the random bf16 Llama model and its LoRA adapter and save both."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SIZES[size])
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights
            else:
                param.normal_(0.0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {size}: {n_params / 1e9:.3f}B params", flush=True)
    model.save_pretrained(base_dir, max_shard_size="2GB")

    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape) * 0.01)
    peft_model.save_pretrained(adapter_dir)


def child_quantize(src_dir: Path, dst_dir: Path) -> None:
    """Save a pre-quantized bitsandbytes NF4 (double quant) checkpoint of the bf16 model in ``src_dir``.

    This is what ``load_in_4bit`` + ``save_pretrained`` writes for a QLoRA base: every decoder ``nn.Linear``
    becomes packed uint8 codes + absmax statistics + a quant-state JSON; embeddings, norms and lm_head stay bf16.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src_dir, quantization_config=qc, device_map="cpu", dtype=torch.bfloat16)
    print(f"loaded + quantized in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    model.save_pretrained(dst_dir, max_shard_size="2GB")
    print(f"saved in {time.perf_counter() - start:.1f} s", flush=True)


def child_quantize_fp8(src_dir: Path, dst_dir: Path) -> None:
    """Save a block-wise FP8 checkpoint (DeepSeek-V3 layout) of the bf16 model in ``src_dir``, shard by shard.

    Every decoder linear weight becomes float8_e4m3fn + ``weight_scale_inv`` per 128x128 block, quantized by
    transformers' own ``Fp8Quantize``; the config gets ``quantization_config`` {"quant_method": "fp8", ...}.
    """
    import types

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128))))
    dst_dir.mkdir(parents=True)
    start = time.perf_counter()
    weight_map: dict[str, str] = {}
    for file in sorted(src_dir.glob("*.safetensors")):
        out: dict[str, Any] = {}
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_tensor(key)
                if key.startswith("model.layers.") and key.endswith("proj.weight"):
                    q = quantizer.convert({key: t})
                    out[key], out[key + "_scale_inv"] = q[key], q[key.removesuffix(".weight") + ".weight_scale_inv"]
                else:
                    out[key] = t
        save_file(out, dst_dir / file.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, file.name))
    if len({*weight_map.values()}) > 1 or not (dst_dir / "model.safetensors").exists():
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((src_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (dst_dir / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src_dir.iterdir():
        if extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json") and extra.is_file():
            shutil.copy(extra, dst_dir / extra.name)
    print(f"quantized to FP8 in {time.perf_counter() - start:.1f} s", flush=True)


def child_peft(quant: str, base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """The transformers + PEFT reference merge (for a 4-bit base: dequantize to bf16 first)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if quant == "none":
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    elif quant == "fp8":  # transformers dequantizes an FP8 checkpoint while loading it on a machine without a GPU
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu")
        # No dtype: config.dtype (bf16). A string dtype crashes in transformers 5.24 ("Invalid device string").
        model = model.dequantize()
        print(f"dequantized to {model.dtype}", flush=True)
    model = PeftModel.from_pretrained(model, adapter_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir, max_shard_size="5GB")


def child_copy(base_dir: Path, out_dir: Path) -> None:
    """Copy the base's safetensors bytes: the floor any merge has to pay."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(base_dir.glob("*.safetensors")):
        shutil.copyfile(src, out_dir / src.name)


DIRECT_CHUNK = 16 << 20


def child_copy_direct(base_dir: Path, out_dir: Path) -> None:
    """Copy the base's safetensors bytes as streammerge moves them: reads with O_DIRECT (as its
    default ``--read auto`` does), writes with O_DIRECT from page-aligned buffers on a second
    thread, fsync at the end. It measures the disk without the page cache, whose writeback on some
    virtual disks is several times slower than the disk itself and whose pages cost a hypervisor
    trip on first touch (docs/benchmarks.md). Either side falls back to the page cache where the
    filesystem refuses O_DIRECT."""
    import mmap
    import queue
    import threading

    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(base_dir.glob("*.safetensors")):
        size, dst = src.stat().st_size, out_dir / src.name
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(dst, flags | os.O_DIRECT, 0o644)
        except OSError:  # a filesystem without direct I/O: the page cache it is
            fd = os.open(dst, flags, 0o644)
        free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(3):
            free.put(mmap.mmap(-1, DIRECT_CHUNK))
        jobs: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()

        def write(fd: int = fd, dst: Path = dst, free: Any = free, jobs: Any = jobs) -> None:
            while (job := jobs.get()) is not None:
                buf, offset, n = job
                body = n - n % 4096
                if body:
                    os.pwrite(fd, memoryview(buf)[:body], offset)
                if n > body:  # the unaligned tail of the file, through the page cache
                    with open(dst, "r+b") as f:
                        f.seek(offset + body)
                        f.write(memoryview(buf)[body:n])
                free.put(buf)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            rfd = os.open(src, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            rfd = os.open(src, os.O_RDONLY)
        offset = 0
        while offset < size:  # every offset is a multiple of DIRECT_CHUNK: aligned for O_DIRECT
            buf = free.get()
            n = min(os.preadv(rfd, [buf], offset), size - offset)
            if n <= 0:
                raise SystemExit(f"{src}: ended early")
            jobs.put((buf, offset, n))
            offset += n
        os.close(rfd)
        jobs.put(None)
        writer.join()
        os.fsync(fd)
        os.close(fd)


def run_child(argv: list[str]) -> None:
    """Dispatch ``_child KIND ARGS...``."""
    kind, paths = argv[0], [Path(a) for a in argv[2:]]
    if kind == "build":
        child_build(argv[1], paths[0], paths[1])
    elif kind == "quantize":
        child_quantize(Path(argv[1]), *paths)
    elif kind == "quantize-fp8":
        child_quantize_fp8(Path(argv[1]), *paths)
    elif kind == "peft":
        child_peft(argv[1], *paths)
    elif kind == "copy":
        child_copy(Path(argv[1]), *paths)
    elif kind == "copy-direct":
        child_copy_direct(Path(argv[1]), *paths)
    else:
        raise SystemExit(f"unknown child kind {kind!r}")


# --------------------------------------------------------------------------- helpers


def child_env() -> dict[str, str]:
    """Environment for every child: offline, and streammerge importable from the repo."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def self_cmd(python: str, *args: str) -> list[str]:
    return [python, str(Path(__file__).resolve()), "_child", *args]


@dataclass
class Inputs:
    """What the methods read: the merge base (bf16, or 4-bit with --quant nf4), the bf16 base, the adapter."""

    quant: str
    base: Path
    bf16_base: Path
    adapter: Path


def method_cmd(method: str, python: str, inputs: Inputs, out: Path, device: str = "auto", vram_budget: str | None = None) -> list[str]:
    base, adapter = inputs.base, inputs.adapter
    if method == "copy":
        return self_cmd(python, "copy", str(base), str(out))
    if method == "copy-bf16":
        return self_cmd(python, "copy", str(inputs.bf16_base), str(out))
    if method == "copy-direct":
        return self_cmd(python, "copy-direct", str(inputs.bf16_base), str(out))
    if method == "peft":
        return self_cmd(python, "peft", inputs.quant, str(base), str(adapter), str(out))
    return [
        python,
        "-m",
        "streammerge",
        "merge",
        str(base),
        str(adapter),
        "-o",
        str(out),
        "--quiet",
        "--overwrite",
        "--device",
        device,
        *(["--vram-budget", vram_budget] if vram_budget else []),
        *(["--read", "mmap"] if method == "streammerge-mmap" else []),
    ]


def can_drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def prepare_cache(cold: bool) -> None:
    os.sync()
    if cold:
        DROP_CACHES.write_text("3\n")


def measure(cmd: list[str], log_path: Path) -> Measurement:
    """Run ``cmd`` once; wall time, then the flush time, and the child's own ru_maxrss."""
    with log_path.open("w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    start = time.perf_counter()
    os.sync()
    sync = time.perf_counter() - start
    return Measurement(wall, sync, usage.ru_maxrss / 1024, proc.returncode)


def log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def safetensors_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


# --------------------------------------------------------------------------- building


def read_stamp(stamp: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The stamp's contents when it records a completed build of ``spec`` (extra keys such as timings allowed)."""
    if not stamp.exists():
        return None
    data: dict[str, Any] = json.loads(stamp.read_text())
    return data if {k: data.get(k) for k in spec} == spec else None


def run_build(what: str, cmd: list[str], log: Path) -> Measurement:
    """Run one build child (timed, with its peak RSS); on failure raise with the log's tail."""
    run = measure(cmd, log)
    if run.returncode != 0:
        raise RuntimeError(f"building {what} failed (exit code {run.returncode}); log tail:\n{log_tail(log, 30)}")
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("built ", "loaded ", "saved ")):
            print(f"  {line}")
    return run


def reused(what: str, where: Path, stamp: dict[str, Any]) -> dict[str, Any]:
    took = f" (built earlier in {stamp['build_s']:.1f} s)" if "build_s" in stamp else ""
    print(f"reusing {what} in {where}{took}")
    return {**stamp, "reused": True}


def ensure_model(size: str, model_dir: Path, python: str) -> tuple[Path, Path, dict[str, Any]]:
    """Build base + adapter into ``model_dir`` unless a completed build is already there."""
    base, adapter, stamp = (
        model_dir / "base",
        model_dir / "adapter",
        model_dir / "built.json",
    )
    spec = {"size": size, "shape": SIZES[size], "rank": LORA_RANK, "seed": SEED}
    if (done := read_stamp(stamp, spec)) is not None:
        return base, adapter, reused("model and adapter", model_dir, done)
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    print(f"building {size} model and adapter in {model_dir} ...", flush=True)
    run = run_build("the model", self_cmd(python, "build", size, str(base), str(adapter)), model_dir / "build.log")
    info = {**spec, "build_s": run.wall_s, "build_peak_rss_mb": run.peak_rss_mb}
    stamp.write_text(json.dumps(info))
    print(
        f"built in {run.wall_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB "
        f"(base {dir_size_mb(base):.0f} MB, adapter {dir_size_mb(adapter):.1f} MB)"
    )
    return base, adapter, {**info, "reused": False}


def ensure_quantized(size: str, quant: str, model_dir: Path, bf16_base: Path, python: str) -> tuple[Path, dict[str, Any]]:
    """Build the pre-quantized ``quant`` base from ``bf16_base`` into ``model_dir`` unless already there."""
    qbase, stamp = model_dir / f"base-{quant}", model_dir / f"built-{quant}.json"
    spec = {"size": size, "quant": quant, "double_quant": True, "compute_dtype": "bfloat16", "seed": SEED}
    if (done := read_stamp(stamp, spec)) is not None:
        return qbase, reused(f"{quant} base", qbase, done)
    shutil.rmtree(qbase, ignore_errors=True)
    print(f"quantizing the {size} base to {quant} (transformers, CPU) into {qbase} ...", flush=True)
    kind = "quantize-fp8" if quant == "fp8" else "quantize"
    run = run_build(f"the {quant} base", self_cmd(python, kind, str(bf16_base), str(qbase)), model_dir / f"build-{quant}.log")
    info = {**spec, "build_s": run.wall_s, "build_peak_rss_mb": run.peak_rss_mb}
    stamp.write_text(json.dumps(info))
    print(f"quantized in {run.wall_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB ({quant} base {dir_size_mb(qbase):.0f} MB)")
    return qbase, {**info, "reused": False}


# --------------------------------------------------------------------------- benchmark


def bench_run(
    method: str,
    index: int,
    args: argparse.Namespace,
    inputs: Inputs,
    workdir: Path,
    cold: bool,
    result: MethodResult,
) -> None:
    """Run ``method`` once (run ``index``) and record it in ``result``; nothing once it has failed."""
    if result.error is not None:
        return
    out = workdir / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    prepare_cache(cold)
    log = workdir / f"{method}-{index}.log"
    run = measure(method_cmd(method, args.python, inputs, out, args.device, args.vram_budget), log)
    print(
        f"  {method} run {index + 1}/{args.repeat}: wall {run.wall_s:.2f} s, "
        f"sync {run.sync_s:.2f} s, peak RSS {run.peak_rss_mb:.0f} MB, rc {run.returncode}",
        flush=True,
    )
    if run.returncode != 0:
        result.error = f"exit code {run.returncode}; log tail:\n{log_tail(log)}"
        print(result.error)
        return
    result.runs.append(run)
    result.out_mb = safetensors_mb(out)


def verify(base: Path, sm_out: Path, peft_out: Path) -> dict[str, Any]:
    """Compare a few merged tensors of the two outputs (and check the merge changed them).

    "changed vs base" compares with the base tensor; a 4-bit base weight is first dequantized with
    bitsandbytes (``QuantState.from_dict`` + ``dequantize_4bit``, CPU) to the dtype its quant state records.
    """
    import torch
    from safetensors import safe_open

    quant_state = ".quant_state.bitsandbytes__"

    def index(folder: Path) -> dict[str, Path]:
        names: dict[str, Path] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                names.update((key, file) for key in f.keys())  # noqa: SIM118
        return names

    def load(where: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(where[name], framework="pt") as f:
            return f.get_tensor(name)

    def load_base(where: dict[str, Path], name: str) -> torch.Tensor:
        if name + "_scale_inv" in where:  # block FP8: the formula, float32, to bf16
            w, s = load(where, name), load(where, name + "_scale_inv")
            rows, cols = w.shape
            full = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            return (w.float() * full).to(torch.bfloat16)
        stats = {k: load(where, k) for k in where if k.startswith(name + ".")}
        if not any(quant_state in k for k in stats):
            return load(where, name)
        import bitsandbytes.functional as bnbf

        state = bnbf.QuantState.from_dict({k[len(name) + 1 :]: v for k, v in stats.items()}, device=torch.device("cpu"))
        return bnbf.dequantize_4bit(load(where, name), state)

    sm, pe, bs = index(sm_out), index(peft_out), index(base)
    layers = sorted({int(k.split(".")[2]) for k in pe if k.startswith("model.layers.")})
    picks = [
        f"model.layers.{layers[i * (len(layers) - 1) // (len(TARGET_MODULES) - 1)]}."
        f"{'self_attn' if mod[0] in 'qkvo' else 'mlp'}.{mod}.weight"
        for i, mod in enumerate(TARGET_MODULES)
    ] + ["model.embed_tokens.weight"]
    rows: list[dict[str, Any]] = []
    for name in picks:
        if name not in sm or name not in pe:
            rows.append({"tensor": name, "error": "missing in one output"})
            continue
        a, b, orig = load(sm, name), load(pe, name), load_base(bs, name)
        same = a.shape == b.shape
        rows.append(
            {
                "tensor": name,
                "max_abs_diff": (a.float() - b.float()).abs().max().item() if same else None,
                "frac_identical": (a.float() == b.float()).float().mean().item() if same else None,
                "n_differ": int((a.float() != b.float()).sum().item()) if same else None,
                "numel": a.numel(),
                "frac_changed_vs_base": (b != orig).float().mean().item() if b.shape == orig.shape else None,
                "base_quantized": any(k.startswith(name + quant_state) for k in bs) or name + "_scale_inv" in bs,
                "dtypes": f"{a.dtype} / {b.dtype}".replace("torch.", ""),
                "shape": list(a.shape),
            }
        )
    return {"tensors": rows, "names_equal": sorted(sm) == sorted(pe)}


# --------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    versions = {}
    for pkg in ("torch", "transformers", "peft", "safetensors", "bitsandbytes"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}" if num is not None and den else "n/a"


def method_label(method: str, quant: str) -> str:
    if quant == "none":
        return method
    return {
        "copy": f"copy ({quant} base: read floor)",
        "copy-bf16": "copy-bf16 (bf16 base = output size: write floor)",
        "copy-direct": "copy-direct (bf16 bytes, O_DIRECT reads and writes as streammerge's)",
        "streammerge": f"streammerge ({quant} -> bf16)",
        "streammerge-mmap": f"streammerge --read mmap ({quant} -> bf16)",
        "peft": "peft (dequantize + merge)",
    }[method]


def render(
    results: dict[str, MethodResult],
    info: dict[str, Any],
    cold: bool,
    command: str,
    args: argparse.Namespace,
    base_mb: float,
    bf16_mb: float,
    builds: dict[str, dict[str, Any]],
) -> str:
    def med(method: str, attr: str) -> float | None:
        res = results.get(method)
        return res.median(attr) if res and res.ok else None

    cache = "dropped before each run (cold)" if cold else "NOT dropped (warm)"
    if args.quant == "none":
        title = f"## streammerge benchmark: {args.size} ({base_mb:.0f} MB of base safetensors)"
    else:
        title = (
            f"## streammerge benchmark: {args.size}, {'block FP8' if args.quant == 'fp8' else 'bitsandbytes ' + args.quant.upper()} base "
            f"({base_mb:.0f} MB of quantized base safetensors; the bf16 output is {bf16_mb:.0f} MB)"
        )
    lines = [
        title,
        "",
        f"`{command}`",
        "",
        f"Median of {args.repeat} run(s); page cache {cache}.",
        "",
        "| method | wall s | sync s | wall+sync s | peak RSS MB | out MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        res = results.get(method)
        if res is None:
            continue
        label = method_label(method, args.quant)
        if not res.ok:
            lines.append(f"| {label} | failed | | | | |")
            continue
        out = f"{res.out_mb:.0f}" if res.out_mb is not None else ""
        lines.append(
            f"| {label} | {res.median('wall_s'):.2f} | {res.median('sync_s'):.2f} "
            f"| {res.median('total_s'):.2f} | {res.median('peak_rss_mb'):.0f} | {out} |"
        )
    sm_t, pe_t, cp_t, cw_t, cd_t = (med(m, "wall_s") for m in ("streammerge", "peft", "copy", "copy-bf16", "copy-direct"))
    sm_f, pe_f, cp_f, cw_f, cd_f = (med(m, "total_s") for m in ("streammerge", "peft", "copy", "copy-bf16", "copy-direct"))
    sm_r, pe_r = med("streammerge", "peak_rss_mb"), med("peft", "peak_rss_mb")
    machine = (
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"{info['ram_gb']} GB RAM; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, "
        f"safetensors {info['safetensors']}" + (f", bitsandbytes {info['bitsandbytes']}" if args.quant != "none" else "") + "."
    )
    copy_name = "copy time" if args.quant == "none" else "copy time (read floor)"
    lines += [
        "",
        "| ratio | on wall s | on wall+sync s |",
        "|---|---:|---:|",
        f"| PEFT time / streammerge time | {ratio(pe_t, sm_t)} | {ratio(pe_f, sm_f)} |",
        f"| streammerge time / {copy_name} | {ratio(sm_t, cp_t)} | {ratio(sm_f, cp_f)} |",
    ]
    if args.quant != "none":
        lines.append(f"| streammerge time / copy-bf16 time (write floor) | {ratio(sm_t, cw_t)} | {ratio(sm_f, cw_f)} |")
    if cd_t is not None:
        lines.append(f"| streammerge time / copy-direct time | {ratio(sm_t, cd_t)} | {ratio(sm_f, cd_f)} |")
    sm_mt, sm_mf = med("streammerge-mmap", "wall_s"), med("streammerge-mmap", "total_s")
    if sm_mt is not None:
        lines.append(f"| streammerge --read mmap time / {copy_name} | {ratio(sm_mt, cp_t)} | {ratio(sm_mf, cp_f)} |")
        if cd_t is not None:
            lines.append(f"| streammerge --read mmap time / copy-direct time | {ratio(sm_mt, cd_t)} | {ratio(sm_mf, cd_f)} |")
    lines += [f"| streammerge RSS / PEFT RSS | {ratio(sm_r, pe_r)} | |", ""]
    sm_out = results["streammerge"].out_mb if "streammerge" in results else None
    if sm_t and sm_out:
        budget = f", --vram-budget {args.vram_budget}" if args.vram_budget else ""
        lines += [f"streammerge (--device {args.device}{budget}): {sm_out / 1024 / sm_t:.2f} GiB/s of merged output on wall time.", ""]
    parts = []
    for what, build in builds.items():
        name = "bf16 model + adapter" if what == "model" else f"{what} quantization (transformers, CPU)"
        if "build_s" not in build:
            parts.append(f"{name} reused (no timing recorded)")
            continue
        when = " (earlier run, reused)" if build.get("reused") else ""
        rss = f", peak RSS {build['build_peak_rss_mb']:.0f} MB" if "build_peak_rss_mb" in build else ""
        parts.append(f"{name} {build['build_s']:.1f} s{rss}{when}")
    lines += [f"Builds: {'; '.join(parts)}.", "", machine]
    return "\n".join(lines)


def render_verify(check: dict[str, Any]) -> str:
    lines = [
        "",
        "### streammerge vs PEFT output (sampled tensors)",
        "",
        f"Same tensor names: {check['names_equal']}",
        "",
        "| tensor | dtype (sm / peft) | max abs diff | identical | differing | changed vs base |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in check["tensors"]:
        if "error" in row:
            lines.append(f"| {row['tensor']} | {row['error']} | | | | |")
        elif row["max_abs_diff"] is None:
            lines.append(f"| {row['tensor']} | {row['dtypes']} | shape mismatch | | | |")
        else:
            changed = "n/a" if row["frac_changed_vs_base"] is None else f"{row['frac_changed_vs_base']:.2%}"
            lines.append(
                f"| {row['tensor']} | {row['dtypes']} | {row['max_abs_diff']:.3g} | "
                f"{row['frac_identical']:.4%} | {row['n_differ']} of {row['numel']} | "
                f"{changed}{' (vs dequantized)' if row.get('base_quantized') else ''} |"
            )
    if any(row.get("base_quantized") for row in check["tensors"]):
        lines += [
            "",
            "For 4-bit base weights, 'changed vs base' compares PEFT's output with the base weight dequantized by "
            "bitsandbytes (`dequantize_4bit`, CPU) to the dtype its quant state records.",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def result_json(result: MethodResult) -> dict[str, Any]:
    data: dict[str, Any] = {**asdict(result), "ok": result.ok}
    if result.ok:
        attrs = ("wall_s", "sync_s", "total_s", "peak_rss_mb")
        data["median"] = {attr: result.median(attr) for attr in attrs}
    return data


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="0.1b")
    p.add_argument(
        "--quant",
        choices=QUANTS,
        default="none",
        help="base format: none = the bf16 model; nf4 = a pre-quantized bitsandbytes 4-bit (NF4, double quant) checkpoint of it; "
        "fp8 = a block-wise FP8 (DeepSeek-V3 layout, 128x128 blocks) checkpoint of it",
    )
    p.add_argument("--workdir", type=Path, help="work folder (default: a temp dir under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the built model and outputs")
    p.add_argument("--repeat", type=int, default=1, help="rounds, each running every method once; medians are reported")
    p.add_argument(
        "--only",
        help=f"comma-separated subset of {','.join(METHODS)} (default: all; {','.join(QUANT_ONLY)} needs --quant other than none)",
    )
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    p.add_argument("--warm", action="store_true", help="never drop the page cache")
    p.add_argument("--no-verify", action="store_true", help="skip the output comparison")
    p.add_argument("--python", default=sys.executable, help="interpreter for the children")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="streammerge's --device (PEFT always runs on the CPU)")
    p.add_argument("--vram-budget", help="streammerge's --vram-budget, e.g. 2GiB (default: its own)")
    args = p.parse_args(argv)
    allowed = [m for m in METHODS if args.quant != "none" or m not in QUANT_ONLY]
    args.methods = allowed if args.only is None else [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(args.methods) - set(allowed)
    if unknown or not args.methods:
        p.error(f"--only: unknown or empty method list {sorted(unknown)}; choose from {tuple(allowed)} with --quant {args.quant}")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def cleanup(workdir: Path, created_workdir: bool, size: str) -> None:
    if created_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for child in workdir.iterdir():
        if child.name.startswith("out-") or child.suffix == ".log" or child.name == f"model-{size}":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def main(argv: list[str]) -> int:
    if argv[:1] == ["_child"]:
        run_child(argv[1:])
        return 0
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    created = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="streammerge-bench-")) if created else args.workdir
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = workdir / f"model-{args.size}"
        base, adapter, build = ensure_model(args.size, model_dir, args.python)
        builds = {"model": build}
        inputs = Inputs(args.quant, base, base, adapter)
        if args.quant != "none":
            qbase, builds[args.quant] = ensure_quantized(args.size, args.quant, model_dir, base, args.python)
            inputs = Inputs(args.quant, qbase, base, adapter)
        cold = not args.warm and can_drop_caches()
        methods = [m for m in METHODS if m in args.methods]
        results = {m: MethodResult(m) for m in methods}
        for i in range(args.repeat):  # rounds, so the disk's drift over time hits every method alike
            print(f"round {i + 1}/{args.repeat}: {', '.join(methods)}", flush=True)
            for method in methods:
                bench_run(method, i, args, inputs, workdir, cold, results[method])
        info = machine_info()
        base_mb, bf16_mb = safetensors_mb(inputs.base), safetensors_mb(base)
        print()
        print(render(results, info, cold, command, args, base_mb, bf16_mb, builds))
        check = None
        if not args.no_verify and all(results.get(m) and results[m].ok for m in ("streammerge", "peft")):
            check = verify(inputs.base, workdir / "out-streammerge", workdir / "out-peft")
            print(render_verify(check))
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "command": command,
                        "size": args.size,
                        "quant": args.quant,
                        "base_mb": base_mb,
                        "bf16_base_mb": bf16_mb,
                        "builds": builds,
                        "cold_cache": cold,
                        "repeat": args.repeat,
                        "machine": info,
                        "results": {m: result_json(r) for m, r in results.items()},
                        "verify": check,
                    },
                    indent=2,
                )
            )
            print(f"\nraw numbers written to {args.json}")
        if args.keep:
            print(f"\nkept work folder {workdir}")
    finally:
        if not args.keep:
            cleanup(workdir, created, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
