"""The ``streammerge`` command line: thin click commands over plan / run / describe / demo.

Every command calls one library function and formats its result. Bad input raises a
StreamMergeError; here it becomes one line on stderr and exit code 2 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import click

from streammerge.errors import StreamMergeError
from streammerge.plan import DEFAULT_TILE_BYTES, MODES, Change, Plan
from streammerge.plan import plan as make_plan
from streammerge.sizes import format_bytes, format_seconds, parse_size

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a Unix tool killed by a closed pipe exits with."""

_dtype_option = click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Output dtype of floating tensors: bfloat16/bf16, float16/fp16, float32/fp32, or auto (each tensor keeps the "
    "base's dtype; from a bitsandbytes base, its bnb_4bit_compute_dtype or model dtype; from an FP8 or MXFP4 base, the model dtype).",
)
_shard_option = click.option(
    "--max-shard-size",
    default=None,
    help="Largest output shard, e.g. 5GB, 2GiB, 512MiB (one tensor never splits). Default 5GB; GGUF output: one file "
    "unless given, then STEM-00001-of-0000N.gguf files as llama.cpp's gguf-split writes them.",
)
_format_option = click.option(
    "--format",
    "format",
    type=click.Choice(["auto", "safetensors", "gguf"]),
    default="auto",
    show_default=True,
    help="auto: GGUF when OUT ends in .gguf, else a safetensors model folder. GGUF output is the file OUT as llama.cpp's "
    "convert_hf_to_gguf.py would convert the merged model (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3 text), for llama.cpp, "
    "Ollama, LM Studio.",
)
_outtype_option = click.option(
    "--outtype",
    type=click.Choice(["auto", "bf16", "f16", "q8_0", "f32"]),
    default="auto",
    show_default=True,
    help="GGUF tensor type of the weights (norms, biases and 1-D tensors stay f32; q8_0 falls back to f16 for rows not a "
    "multiple of 32, as the converter does). auto: bf16 for a bfloat16 model, else f16 (the converter's --outtype auto).",
)
_gguf_pre_option = click.option(
    "--gguf-pre",
    default=None,
    metavar="NAME",
    help="GGUF, tokenizer.json (BPE) vocabularies: llama.cpp's pre-tokenizer name to write as tokenizer.ggml.pre "
    "(e.g. llama-bpe for Llama 3, qwen2 for Qwen2/3: what convert_hf_to_gguf.py prints for this tokenizer). Required "
    "for BPE vocabularies; sentencepiece ones (tokenizer.model) need none.",
)
_tile_option = click.option(
    "--tile-size",
    default=f"{DEFAULT_TILE_BYTES // 2**20}MiB",
    show_default=True,
    help="Working memory per tile: large tensors are merged this many bytes of rows at a time.",
)
_device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto uses CUDA when torch can start a GPU, else the CPU (with a note if a GPU seemed to be there).",
)
_mode_option = click.option(
    "--mode",
    type=click.Choice(list(MODES)),
    default="merged_16bit",
    show_default=True,
    help="merged_16bit: a standalone 16-bit model; merged_4bit: linear weights re-quantized to 4 bit (bitsandbytes NF4, "
    "or the base's own 4-bit settings); merged_fp8: from an FP8 base (block-wise fp8 or compressed-tensors), the merged "
    "weights re-quantized into its own FP8 format and blocks with fresh scales, the model keeping the base's size; "
    "merged_mxfp4: from an MXFP4 base (gpt-oss), the merged experts re-quantized into its *_blocks + *_scales with fresh "
    "exponents, the rest as merged_16bit writes it, the experts keeping the base's size; "
    "lora: only the adapter, normalised and checked against the base.",
)
_weights_option = click.option(
    "--weights",
    default=None,
    help="One weight per adapter, comma separated (e.g. 0.7,0.3); default 1 each.",
)
_combination_option = click.option(
    "--combination",
    type=click.Choice(["cat", "linear"]),
    default="cat",
    show_default=True,
    help="cat: W + sum_i w_i s_i B_i A_i (exact, any ranks; PEFT's 'cat'); linear: PEFT's 'linear' "
    "(weighted sums of the A's and of the B's, equal ranks, cross terms included).",
)
_max_ram_option = click.option(
    "--max-ram", default=None, help="RAM budget, e.g. 1GiB: tiles shrink until the plan's peak estimate fits (refused if impossible)."
)
_vram_option = click.option(
    "--vram-budget", default=None, help="GPU memory budget, e.g. 8GiB (default: 80% of what is free when the run starts)."
)
_read_option = click.option(
    "--read",
    "reads",
    type=click.Choice(["auto", "direct", "mmap"]),
    default="auto",
    show_default=True,
    help="How base weights are read. direct: O_DIRECT into two reused buffers, past the page cache (no CPU time for "
    "filling and mapping cache pages: a cold 3B merge took 10.9 s instead of 18.6 s on a 2-core VM); mmap: through the "
    "page cache (quicker when the model is already cached); auto: mmap when the base is mostly in the page cache "
    "already or its filesystem refuses O_DIRECT, else direct.",
)
_verify_option = click.option("--verify", "verify_after", is_flag=True, help="Run `streammerge verify` on the output when done.")
_resume_option = click.option(
    "--resume", is_flag=True, help="Continue an interrupted run of the same command from OUT.partial (only unfinished tensors are redone)."
)
_quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")


@contextmanager
def _bar(label: str, quiet: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    """A byte progress bar on stderr for the block (None when quiet), its line ended afterwards."""
    if quiet:
        yield None
        return
    from streammerge.progress import ProgressBar

    bar = ProgressBar(label)
    try:
        yield bar
    finally:
        bar.close()


_out_option = click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(),
    help="Output folder (written atomically; must not exist), or a .gguf file for GGUF output (see --format).",
)
_overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
_PLAN_PARAMS = (
    click.argument("base", type=click.Path()),
    click.argument("adapters", nargs=-1, required=True, type=click.Path()),
    _out_option,
    _dtype_option,
    _shard_option,
    _tile_option,
    _device_option,
    _mode_option,
    _weights_option,
    _combination_option,
    _max_ram_option,
    _vram_option,
    _overwrite_option,
    _format_option,
    _outtype_option,
    _gguf_pre_option,
)
"""What makes a plan: the arguments and options `merge` and `plan` share, in --help order."""

Command = TypeVar("Command", bound=Callable[..., Any])


def _plan_params(f: Command) -> Command:
    """Decorate a command with :data:`_PLAN_PARAMS`; it receives them as keywords for :func:`_make_plan`."""
    for param in reversed(_PLAN_PARAMS):
        f = param(f)
    return f


class _Group(click.Group):
    """Maps StreamMergeError (and OS errors) to one line and exit code 2 unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
            _silence_stdout()
            ctx.exit(EXIT_BROKEN_PIPE)
        except (StreamMergeError, OSError) as e:
            if ctx.meta.get("streammerge.debug"):
                raise
            click.echo(f"streammerge: error: {_one_line(e)}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            if ctx.meta.get("streammerge.debug"):
                raise
            click.echo(f"streammerge: interrupted; {ctx.meta.get('streammerge.partial_hint', 'nothing was written')}", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail again on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, StreamMergeError) and e.filename:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e)
    return " ".join(text.split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="streammerge")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Merge LoRA adapters into Hugging Face safetensors models out of core.

    \b
    streammerge plan  BASE LORA -o OUT      dry run: what it will do and need
    streammerge merge BASE LORA -o OUT      merge (peak RAM bounded by one tile)
    streammerge run   plan.json             execute a saved plan (--part K/N: one part of it)
    streammerge finish plan.json            assemble OUT from the parts of a split run
    streammerge verify OUT                  check an output against its manifest
    streammerge pack OUT / unpack P -o OUT  byte-grouped zstd for transfer, restored byte for byte
    streammerge inspect PATH                what a model, adapter or file holds
    streammerge demo                        built-in example, no download
    """
    ctx.meta["streammerge.debug"] = debug


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError as e:
        raise StreamMergeError(f"--weights {text!r} must be numbers separated by commas, e.g. 0.7,0.3") from e


def _make_plan(
    *,
    base: str,
    adapters: tuple[str, ...],
    out: str,
    dtype: str,
    max_shard_size: str | None,
    tile_size: str,
    device: str,
    overwrite: bool,
    mode: str,
    weights: str | None,
    combination: str,
    max_ram: str | None,
    vram_budget: str | None,
    format: str = "auto",
    outtype: str = "auto",
    gguf_pre: str | None = None,
) -> Plan:
    """The plan a `merge` or `plan` command line describes (:data:`_PLAN_PARAMS`, by name)."""
    return make_plan(
        base,
        list(adapters),
        out,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tile_size=tile_size,
        device=device,
        overwrite=overwrite,
        mode=mode,
        weights=_parse_weights(weights),
        combination=combination,
        max_ram=max_ram,
        vram_budget=vram_budget,
        format=format,
        outtype=outtype,
        gguf_pre=gguf_pre,
    )


def _output_kind(p: Plan) -> str:
    if p.format == "gguf":
        types = sorted({u.out_dtype for u in p.units})
        return f"GGUF, tensors {'/'.join(types)}, merged in the model dtype"
    return f"dtype {p.dtype}, {p.mode}"


def _resume_command() -> str:
    """The command line of this process with --resume (added if missing), as the user can paste it."""
    args = [a for a in sys.argv[1:]]
    if "--resume" not in args:
        args.append("--resume")
    return " ".join(["streammerge", *(shlex.quote(a) for a in args)])


def _describe_plan(p: Plan, full: bool = False) -> list[tuple[str, str]]:
    e = p.estimate
    tensors = len(p.units)
    in_bytes = sum(u.source.nbytes for u in p.units)
    rows = [
        ("base", f"{p.base}  ({tensors} tensors, {format_bytes(in_bytes)})"),
        *[
            ("adapter", f"{a}  ({', '.join(f)}{f'; weight {w:g}' if len(p.adapters) > 1 else ''})")
            for a, f, w in zip(p.adapters, p.flavours, p.weights, strict=True)
        ],
        ("output", f"{p.out}  ({len(p.shards)} shard{'s' if len(p.shards) != 1 else ''}, {_output_kind(p)})"),
        (
            "work",
            "  ".join(f"{op} {e.units.get(op, 0)}" for op in ("merge", "dequant", "cast", "copy") if op in e.units or op != "dequant"),
        ),
        ("peak RAM", f"{format_bytes(e.peak_host_bytes)}  (largest unit: {e.largest_unit})"),
        ("peak VRAM", format_bytes(e.peak_device_bytes) if e.peak_device_bytes else "none (CPU)"),
        ("disk", f"{format_bytes(e.output_bytes)} written, {format_bytes(e.read_bytes)} read"),
        (
            "time",
            f"about {format_seconds(e.seconds)} on a 2-core machine with a ~0.5 GB/s disk (the disk decides), after 1-3 s to start torch",
        ),
    ]
    rows += [("note", n) for n in p.notes]
    rows += _change_rows(p.changes, len(p.adapters), full)
    return rows


def _change_rows(changes: Sequence[Change], adapters: int, full: bool) -> list[tuple[str, str]]:
    """What each adapter module changes in the base: folded over layers and experts, or (``full``) one by one."""
    from streammerge.describe import change_summary

    def who(i: int) -> str:
        return f"changes (adapter {i + 1})" if adapters > 1 else "changes"

    if full:
        return [(who(c.adapter), f"{c.module} -> {', '.join(c.tensors)}") for c in changes]
    rows = []
    for r in change_summary(changes):
        times = f" (x{r['modules']}, {r['tensor_count']} tensors)" if r["modules"] > 1 else ""
        rows.append((who(r["adapter"]), f"{r['module']}{times} -> {', '.join(r['tensors'])}"))
    return rows


def _echo_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _execute(
    p: Plan,
    quiet: bool,
    device: str | None,
    resume: bool = False,
    vram_budget: str | None = None,
    reads: str = "auto",
    as_json: bool = False,
    part: tuple[int, int] | None = None,
    ray: tuple[str | None, int | None] | None = None,
    pack_to: str | None = None,
) -> None:
    from streammerge import run
    from streammerge.execute import Report
    from streammerge.journal import partial_path

    for note in p.notes:  # said once, before the work, whatever --quiet says
        click.echo(f"streammerge: note: {note}", err=True)
    budget = None if vram_budget is None else parse_size(vram_budget, "VRAM budget")
    ctx = click.get_current_context()
    partial = partial_path(p.out)
    again = _resume_command() if part is None else "the same command"
    ctx.meta["streammerge.partial_hint"] = f"finished work (if any) is kept in {partial}; continue with: {again}"
    try:
        if ray is not None:
            if part is not None:
                raise StreamMergeError("--ray runs every part itself; --part K/N is for one part run by hand")
            report: Report = run(
                p,
                progress=not (quiet or as_json),
                device=device,
                vram_budget=budget,
                reads=reads,
                engine="ray",
                address=ray[0],
                parts=ray[1],
                pack_to=pack_to,
            )
        else:
            report = run(
                p,
                progress=not (quiet or as_json),
                device=device,
                resume=resume,
                vram_budget=budget,
                reads=reads,
                part=part,
                pack_to=pack_to,
            )
    except KeyboardInterrupt:
        kept = os.path.isdir(partial)
        ctx.meta["streammerge.partial_hint"] = (
            f"the finished part is kept in {partial}; continue with: {again}" if kept else "nothing was kept"
        )
        raise
    for note in report.notes[len(p.notes) :]:
        click.echo(f"streammerge: note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report), indent=1))
    elif not quiet and part is not None and not report.bytes_written:
        pass  # a part with nothing to do: its note said so
    elif not quiet:
        rate = report.bytes_written / max(report.seconds, 1e-9)
        units = ", ".join(f"{n} {op}" for op, n in sorted(report.units.items()))
        vram = (
            f" (peak VRAM {format_bytes(report.peak_device_bytes)} of a {format_bytes(report.device_budget_bytes)} budget)"
            if report.device_budget_bytes
            else ""
        )
        what = report.out if part is None else f"part {part[0]}/{part[1]} of {report.out}"
        click.echo(
            f"wrote {what}: {format_bytes(report.bytes_written)} in {report.seconds:.1f} s ({format_bytes(int(rate))}/s) "
            f"on {report.device}{vram}, base {'read with O_DIRECT' if report.reads == 'direct' else 'mapped'}; {units}; "
            f"peak RSS {format_bytes(report.peak_rss_bytes)}",
            err=True,
        )


def _ray_options(f: Command) -> Command:
    f = click.option(
        "--parts",
        "ray_parts",
        type=click.IntRange(min=1),
        default=None,
        help="With --ray: how many parts (Ray tasks) to split the plan into (default: as many as the cluster fits, "
        "at most one per output shard).",
    )(f)
    return click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="",
        default=None,
        metavar="[ADDRESS]",
        help="Run the plan's parts as Ray tasks (pip install 'streammerge[ray]'): on the cluster at ADDRESS ('auto': the one "
        "this node is in), else RAY_ADDRESS's or a local Ray. Inputs and OUT must be at the same paths on every node. "
        "A bare --ray takes the next word as ADDRESS unless that word is an existing path (write --ray=ADDRESS to be sure).",
    )(f)


class _RayCommand(click.Command):
    """A command with ``--ray [ADDRESS]``: a bare ``--ray`` followed by an existing path (BASE, an adapter,
    the plan) is read as ``--ray`` with no address, so ``merge --ray BASE ADAPTER -o OUT`` works."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _bare_ray(args))


def _bare_ray(args: list[str]) -> list[str]:
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word == "--":
            break
        if word == "--ray" and os.path.exists(out[i + 1]):
            out[i] = "--ray="
    return out


def _ray_spec(address: str | None, count: int | None) -> tuple[str | None, int | None] | None:
    if address is None:
        if count is not None:
            raise StreamMergeError("--parts is for --ray (one part by hand: streammerge run PLAN --part K/N)")
        return None
    return (address or None, count)


@cli.command(cls=_RayCommand)
@_plan_params
@_read_option
@_resume_option
@_verify_option
@_quiet_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a machine-readable report on stdout when done (out, bytes_written, seconds, peak_rss_bytes, reads, device, "
    "units, notes, ...); no progress bar. Notes and errors still go to stderr.",
)
@click.option(
    "--pack",
    "pack_after",
    is_flag=True,
    help="Also write OUT.smpack (as `streammerge pack OUT` would), compressed from the merge's stream as the tiles are "
    "written (a resumed or --ray run packs the finished output instead).",
)
@_ray_options
def merge(
    reads: str,
    resume: bool,
    verify_after: bool,
    quiet: bool,
    as_json: bool,
    pack_after: bool,
    ray_address: str | None,
    ray_parts: int | None,
    **spec: Any,
) -> None:
    """Merge the LoRA ADAPTERS into the model in BASE and write a standalone model to OUT.

    \b
    Examples:
      streammerge merge ./Llama-3.1-8B ./my-lora -o ./merged --dtype bfloat16
      streammerge merge ./llama-bnb-4bit ./qlora -o ./merged            (16-bit output)
      streammerge merge ./llama-bnb-4bit ./qlora -o ./merged-4bit --mode merged_4bit
      streammerge merge ./DeepSeek-V3 ./lora -o ./merged-fp8 --mode merged_fp8   (FP8 in, FP8 out)
      streammerge merge ./gpt-oss-20b ./lora -o ./merged-mx --mode merged_mxfp4   (MXFP4 experts in and out)
    Several adapters: streammerge merge BASE A1 A2 -o OUT --weights 0.7,0.3 gives
    W + sum_i w_i s_i B_i @ A_i (one read and one write of the base, whatever their number).
    """
    ray = _ray_spec(ray_address, ray_parts)
    p = _make_plan(**spec)
    if p.format == "gguf" and (pack_after or verify_after or ray is not None):
        raise StreamMergeError("--pack, --verify and --ray are for safetensors output; a GGUF file is checked by loading it in llama.cpp")
    pack_to = p.out.rstrip(os.sep) + ".smpack" if pack_after else None
    _execute(p, quiet, None, resume, spec["vram_budget"], reads, as_json, ray=ray, pack_to=pack_to)
    if verify_after:
        _report_verify(p.out, None, 0, quiet=as_json)


@cli.command("plan")
@_plan_params
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan, with its estimate, as JSON.")
@click.option("--save", type=click.Path(), help="Save the plan as JSON here; run it later with `streammerge run`.")
@click.option(
    "--changes", "all_changes", is_flag=True,
    help="List every adapter module and the base tensors it changes (default: folded over layers and experts).",
)  # fmt: skip
def plan_cmd(as_json: bool, save: str | None, all_changes: bool, **spec: Any) -> None:
    """Dry run: read headers only and show what a merge would do and need.

    \b
    Example:
      streammerge plan ./Llama-3.1-70B ./my-lora -o ./merged --save plan.json
      streammerge run plan.json
    """
    p = _make_plan(**spec)
    if save:
        p.save(save)
    if as_json:
        click.echo(p.to_json())
    else:
        _echo_table(_describe_plan(p, all_changes))
        if save:
            click.echo(f"plan saved to {save}; run it with: streammerge run {save}")


@cli.command("run", cls=_RayCommand)
@click.argument("plan_file", type=click.Path())
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Override the plan's device.")
@_read_option
@_resume_option
@_overwrite_option
@_quiet_option
@click.option(
    "--part",
    "part_text",
    default=None,
    metavar="K/N",
    help="Run only part K of N (the plan split by output shard, balanced by bytes): many processes or machines write the "
    "same OUT.partial, each continues its own part when run again, and the last one assembles OUT.",
)
@_ray_options
def run_cmd(
    plan_file: str,
    device: str | None,
    reads: str,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    part_text: str | None,
    ray_address: str | None,
    ray_parts: int | None,
) -> None:
    """Execute a plan saved by `streammerge plan --save`. Inputs must be unchanged since.

    \b
    In parts, e.g. as a Slurm array job (see README):
      streammerge run plan.json --part $SLURM_ARRAY_TASK_ID/8
      streammerge finish plan.json        (only needed if the last part could not assemble OUT)
    """
    from streammerge import parts

    part = None if part_text is None else parts.parse(part_text)
    p = Plan.load(plan_file)
    if p.format == "gguf" and (part is not None or ray_address is not None):
        raise StreamMergeError(f"{plan_file}: a GGUF plan runs whole (--part and --ray are for safetensors output)")
    if overwrite:
        p = dataclasses.replace(p, overwrite=True)
    _execute(p, quiet, device, resume, reads=reads, part=part, ray=_ray_spec(ray_address, ray_parts))


@cli.command("finish")
@click.argument("plan_file", type=click.Path())
def finish_cmd(plan_file: str) -> None:
    """Assemble OUT once every part of a split run is done (`streammerge run PLAN --part K/N`).

    The last part does this on its own; this says which parts are missing otherwise.
    """
    from streammerge import parts
    from streammerge.lock import output_lock

    p = Plan.load(plan_file)
    with output_lock(p.out, shared=True):  # beside running parts, never beside a whole run
        click.echo(parts.finish(p, plan_file), err=True)


@cli.command("pack")
@click.argument("src", type=click.Path())
@click.option("-o", "--out", "dest", type=click.Path(), default=None, help="Packed folder to write (default: SRC.smpack).")
@click.option(
    "--level",
    default=1,
    show_default=True,
    help="zstd level (1-22); on weights 1 packs smallest and fastest, higher levels find matches that cost more than they save.",
)
@click.option("--threads", default=None, type=int, help="Compressing threads (default: one per CPU).")
@click.option("--chunk-size", default="16MiB", show_default=True, help="Raw bytes per compressed chunk (memory: about 2 x threads chunks).")
@_overwrite_option
@_quiet_option
def pack_cmd(src: str, dest: str | None, level: int, threads: int | None, chunk_size: str, overwrite: bool, quiet: bool) -> None:
    """Pack a model folder for transfer: byte-grouped zstd per chunk (bf16: ~1.4x smaller), lossless.

    \b
    Example:
      streammerge pack ./merged                     (writes ./merged.smpack)
      streammerge unpack ./merged.smpack -o ./merged-again
    """
    from streammerge.pack import pack

    with _bar("packing", quiet) as bar:
        r = pack(
            src, dest, level=level, threads=threads, chunk_bytes=parse_size(chunk_size, "chunk size"), overwrite=overwrite, progress=bar
        )
    if quiet:
        return
    click.echo(
        f"packed {r.src} into {r.dest}: {format_bytes(r.raw_bytes)} -> {format_bytes(r.packed_bytes)} ({r.ratio:.3f}x) "
        f"in {r.seconds:.1f} s ({format_bytes(int(r.raw_bytes / max(r.seconds, 1e-9)))}/s)",
        err=True,
    )


@cli.command("unpack")
@click.argument("src", type=click.Path())
@click.option("-o", "--out", "dest", required=True, type=click.Path(), help="Folder to restore into (written atomically).")
@click.option("--threads", default=None, type=int, help="Decompressing threads (default: one per CPU).")
@_overwrite_option
@_quiet_option
def unpack_cmd(src: str, dest: str, threads: int | None, overwrite: bool, quiet: bool) -> None:
    """Restore a folder packed by `streammerge pack`: the same bytes, each tensor checked against the manifest's CRC-32."""
    from streammerge.pack import unpack

    with _bar("unpacking", quiet) as bar:
        r = unpack(src, dest, threads=threads, overwrite=overwrite, progress=bar)
    if quiet:
        return
    checked = f"{r.checked_tensors} tensors match the manifest's CRC-32" if r.checked_tensors else "no manifest: chunk CRC-32s checked"
    click.echo(
        f"unpacked {r.src} into {r.dest}: {format_bytes(r.raw_bytes)} in {r.seconds:.1f} s "
        f"({format_bytes(int(r.raw_bytes / max(r.seconds, 1e-9)))}/s); {checked}",
        err=True,
    )


@cli.command("verify")
@click.argument("out", type=click.Path())
@click.option(
    "--against",
    nargs=2,
    type=click.Path(),
    default=None,
    metavar="BASE ADAPTER",
    help="Also recompute a sample of tensors from these inputs (with the dtype, mode, weights and combination the "
    "merge used, from its manifest).",
)
@click.option(
    "--adapter", "more_adapters", multiple=True, type=click.Path(), help="A further adapter of the merge, for --against (repeat)."
)
@click.option(
    "--recompute", is_flag=True, help="Recompute a sample of tensors from the base and adapters the manifest names (as --against)."
)
@click.option("--sample", default=8, show_default=True, help="How many merged tensors --against / --recompute recompute.")
def verify_cmd(out: str, against: tuple[str, str] | None, more_adapters: tuple[str, ...], recompute: bool, sample: int) -> None:
    """Check a merged folder: headers, index, sizes and the CRC-32 of every tensor recorded at write time.

    \b
    Exit code 0: intact; 1: damage found (listed); 2: bad input.
    Examples:
      streammerge verify ./merged --recompute                      (inputs as the manifest records them)
      streammerge verify ./merged --against ./base ./my-lora
      streammerge verify ./merged --against ./base ./a1 --adapter ./a2   (a two-adapter merge)
    """
    if more_adapters and not against:
        raise StreamMergeError("--adapter adds to --against BASE ADAPTER; give --against too (or --recompute)")
    if against and recompute:
        raise StreamMergeError("give --against or --recompute, not both")
    inputs: tuple[str, list[str]] | str | None = (against[0], [against[1], *more_adapters]) if against else None
    if os.path.isfile(out) and _is_gguf(out):
        raise StreamMergeError(
            f"{out}: a GGUF file; verify checks safetensors output folders (GGUF output is written as llama.cpp's converter "
            "writes it: load it in llama.cpp to check it)"
        )
    _report_verify(out, "manifest" if recompute else inputs, sample)


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _report_verify(out: str, against: tuple[str, list[str]] | str | None, sample: int, quiet: bool = False) -> None:
    from streammerge.verify import verify

    report = verify(out, against=against, sample=sample)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for problem in report.problems:
        click.echo(f"PROBLEM: {problem}", err=True)
    summary = f"{report.tensors} tensors in {report.files} files; {report.checksummed} checksums"
    if against:
        summary += f"; {report.recomputed} tensors recomputed"
    click.echo(f"verify {out}: {'OK' if report.ok else 'FAILED'} ({summary})", err=quiet)
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--tensors", is_flag=True, help="List every tensor.")
@click.option(
    "--base", type=click.Path(), default=None,
    help="With an adapter: the base model; shows which base tensors each adapter module changes (--tensors: every one).",
)  # fmt: skip
def inspect(path: str, as_json: bool, tensors: bool, base: str | None) -> None:
    """Show what a model folder, an adapter folder or a .safetensors file holds (headers only).

    \b
    Examples:
      streammerge inspect ./Mixtral-8x7B
      streammerge inspect ./my-lora --base ./Mixtral-8x7B     (which base tensors each module changes)
    """
    from streammerge.describe import describe

    info = describe(path, base=base)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    skip = {"tensor_list", "changes", "change_list"}
    rows = [(k, _fmt_value(k, v)) for k, v in info.items() if k not in skip and v not in (None, [], {})]
    if "change_list" in info:
        listed = [Change(c["adapter"], c["module"], tuple(c["tensors"])) for c in info["change_list"]]
        rows += _change_rows(listed, 1, tensors)
    _echo_table(rows)
    if tensors:
        for t in info["tensor_list"]:
            click.echo(f"  {t['name']}  {t['dtype']}  {t['shape']}  {format_bytes(t['bytes'])}  {t['file']}")


def _fmt_value(key: str, value: Any) -> str:
    if key == "bytes":
        return format_bytes(int(value))
    if key == "bytes_by_dtype":
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


@cli.command()
@click.option("--dir", "workdir", type=click.Path(), help="Build the example here and keep it (default: a temporary folder).")
def demo(workdir: str | None) -> None:
    """Build a small Llama-shaped model and LoRA adapter locally, merge them, and check the result.

    The check compares every merged tensor with a float64 reference; when transformers and peft
    are installed it also loads the output with transformers and compares with PEFT's
    merge_and_unload of the same inputs.
    """
    from streammerge.demo import run_demo

    ok = run_demo(workdir, echo=lambda s: click.echo(s))
    if not ok:
        sys.exit(1)


def main() -> None:
    """Console entry point.

    When the command is over (its output flushed; a merge's folder fsynced and in place), the
    process ends at once, without the interpreter's teardown: finalizing torch's modules takes
    0.5-1 s here, a tenth of a 1B merge. An exception click does not turn into an exit code
    (a bug) still unwinds normally, with its traceback.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli(prog_name="streammerge")
    except SystemExit as e:
        _exit_now(e.code)
    _exit_now(0)


def _exit_now(code: str | int | None) -> NoReturn:
    """``sys.exit(code)``'s status and message, then ``os._exit``: no atexit handlers, no module teardown."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): Python prints it and exits with 1
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head) or stream: what Python itself exits with then
            status = status or 120
    os._exit(status)


if __name__ == "__main__":
    main()
