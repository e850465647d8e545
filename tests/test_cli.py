"""The command line as a user meets it: exit codes, one-line errors, progress, plan files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_llama, make_lora, peak_rss_of, run_cli


def assert_one_line_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streammerge: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_merge_plan_run_inspect(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    r = run_cli("plan", str(llama_base), str(llama_lora), "-o", str(tmp_path / "out"), "--save", str(tmp_path / "plan.json"))
    assert r.exit_code == 0 and "peak RAM" in r.output and "merge 14" in r.output
    r = run_cli("plan", str(llama_base), str(llama_lora), "-o", str(tmp_path / "out"), "--json")
    estimate = json.loads(r.output)["estimate"]
    assert {"peak_host_bytes", "peak_device_bytes", "output_bytes"} <= set(estimate)
    r = run_cli("run", str(tmp_path / "plan.json"))
    assert r.exit_code == 0, r.stderr
    assert "merging 100%" in r.stderr and "wrote" in r.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    r = run_cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "out2"), "--dtype", "bf16", "--quiet")
    assert r.exit_code == 0 and r.stderr == "" and r.output == ""
    for path, kind in ((llama_base, "model"), (llama_lora, "LoRA adapter"), (tmp_path / "out" / "model.safetensors", "safetensors file")):
        r = run_cli("inspect", str(path))
        assert r.exit_code == 0 and kind in r.output
        assert json.loads(run_cli("inspect", str(path), "--json").output)["kind"] == kind


def test_help_teaches() -> None:
    r = run_cli("--help")
    assert r.exit_code == 0 and "streammerge plan" in r.output
    r = run_cli("merge", "--help")
    assert "--max-shard-size" in r.output and "Example" in r.output


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["merge", "{tmp}/nope", "{lora}", "-o", "{tmp}/o"], ["nope", "does not exist"]),
        (["merge", "{base}", "{tmp}/nolora", "-o", "{tmp}/o"], ["nolora"]),
        (["merge", "{base}", "{lora}", "-o", "{base}/inside"], ["inside input"]),
        (["merge", "{base}", "{lora}", "-o", "{tmp}/o", "--dtype", "int4"], ["int4"]),
        (["merge", "{base}", "{lora}", "-o", "{tmp}/o", "--max-shard-size", "lots"], ["lots"]),
        (["run", "{tmp}/missing-plan.json"], ["missing-plan.json"]),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], needles: list[str], llama_base: Path, llama_lora: Path, tmp_path: Path
) -> None:
    fill = {"{tmp}": str(tmp_path), "{base}": str(llama_base), "{lora}": str(llama_lora)}
    resolved = [a for a in args]
    for i, a in enumerate(resolved):
        for k, v in fill.items():
            a = a.replace(k, v)
        resolved[i] = a
    assert_one_line_error(run_cli(*resolved), *needles)


def test_existing_output_needs_overwrite(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    assert_one_line_error(run_cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o")), "already exists", "--overwrite")
    assert run_cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"), "--overwrite", "-q").exit_code == 0


def copy_base(llama_base: Path, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    return base


def test_lying_header_names_file_and_tensor(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    base = copy_base(llama_base, tmp_path)
    path = base / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] * 2]
    body = json.dumps(header).encode()
    body += b" " * (n - len(body)) if len(body) <= n else b""
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    assert_one_line_error(run_cli("merge", str(base), str(llama_lora), "-o", str(tmp_path / "o")), str(path), name)


def test_truncated_shard(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    base = copy_base(llama_base, tmp_path)
    path = base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_one_line_error(run_cli("plan", str(base), str(llama_lora), "-o", str(tmp_path / "o")), str(path), "truncated")


def test_index_escaping_the_folder_is_refused(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    base = copy_base(llama_base, tmp_path)
    names = list(json.loads(run_cli("inspect", str(base), "--json").output)["tensor_list"])
    index = {"metadata": {}, "weight_map": {t["name"]: "../model.safetensors" for t in names}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(run_cli("plan", str(base), str(llama_lora), "-o", str(tmp_path / "o")), "not a plain file name")


def test_pickle_adapter_is_refused(llama_base: Path, tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (lora / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    assert_one_line_error(run_cli("merge", str(llama_base), str(lora), "-o", str(tmp_path / "o")), "adapter_model.bin", "pickle")


def test_unsupported_adapter_contents_are_refused_not_dropped(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    lora = tmp_path / "lora"
    shutil.copytree(llama_lora, lora)
    tensors = load_file(lora / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_P.weight"] = tensors[next(iter(tensors))][:2].clone()
    save_file(tensors, lora / "adapter_model.safetensors")
    assert_one_line_error(run_cli("merge", str(llama_base), str(lora), "-o", str(tmp_path / "o")), "lora_P", "refusing")
    assert not (tmp_path / "o").exists()
    config = json.loads((llama_lora / "adapter_config.json").read_text())
    config["alora_invocation_tokens"] = [1, 2]
    (lora / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("plan", str(llama_base), str(lora), "-o", str(tmp_path / "o")), "activated LoRA")


def test_adapter_config_with_wrong_types(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    shutil.copytree(llama_lora, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    config["lora_alpha"] = "sixteen"
    (lora / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("plan", str(llama_base), str(lora), "-o", str(tmp_path / "o")), "adapter_config.json", "lora_alpha")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from streammerge.cli import cli
    from streammerge.errors import BadCheckpoint

    result = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "nope")])
    assert isinstance(result.exception, Exception) and not isinstance(result.exception, SystemExit)
    assert result.exit_code != 0
    assert isinstance(result.exception, BadCheckpoint) or "nope" in str(result.exception)


def test_changed_input_after_planning_is_refused(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    base = copy_base(llama_base, tmp_path)
    assert run_cli("plan", str(base), str(llama_lora), "-o", str(tmp_path / "o"), "--save", str(tmp_path / "p.json")).exit_code == 0
    os.utime(base / "model.safetensors", ns=(0, 0))
    assert_one_line_error(run_cli("run", str(tmp_path / "p.json")), "changed since the plan")


@pytest.mark.parametrize("reads", ["mmap", "direct"])
def test_peak_rss_stays_under_the_estimate(tmp_path: Path, reads: str) -> None:
    """Run the real CLI in a child process and compare its ru_maxrss with the plan's bound."""
    base = make_llama(tmp_path / "base", hidden_size=512, intermediate_size=1536, num_hidden_layers=2, vocab_size=8000)
    lora = make_lora(base, tmp_path / "lora", r=16)
    out = tmp_path / "out"
    planned = json.loads(run_cli("plan", str(base), str(lora), "-o", str(out), "--json", "--tile-size", "4MiB").output)
    cmd = [sys.executable, "-m", "streammerge", "merge", str(base), str(lora), "-o", str(out), "-q", "--tile-size", "4MiB", "--read", reads]
    peak = peak_rss_of(cmd)
    assert 100 * 2**20 < peak <= planned["estimate"]["peak_host_bytes"], (peak, planned["estimate"]["peak_host_bytes"])


def test_demo_runs() -> None:
    r = run_cli("demo")
    assert r.exit_code == 0, r.output + r.stderr
    assert "demo OK" in r.output and "merge_and_unload" in r.output


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"lora_alpha": float("nan")}, "finite"),
        ({"rank_pattern": {"q_proj": 0}}, "positive integer"),
        ({"init_lora_weights": "pissa_niter_4"}, "residual base"),
        ({"init_lora_weights": "lora_ga"}, "residual base"),  # LoRA-GA subtracts B @ A from the base at init
        ({"kasa_config": {"beta": 1e-4}}, "truncates the base weight"),
        ({"arrow_config": {"top_k": 2}}, "cannot be merged"),
    ],
)
def test_bad_adapter_configs_exit_2(llama_base: Path, llama_lora: Path, tmp_path: Path, edit: dict[str, Any], needle: str) -> None:
    lora = tmp_path / "lora"
    shutil.copytree(llama_lora, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    config.update(edit)
    (lora / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("plan", str(llama_base), str(lora), "-o", str(tmp_path / "o")), needle)


def test_cli_process_exit_status_and_output(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    """The console entry point skips the interpreter's teardown: statuses and output must survive that."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "streammerge", *args], capture_output=True, text=True, timeout=300)

    planned = cli("plan", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"), "--json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["estimate"]["output_bytes"] > 0  # all of it arrived
    merged = cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"), "-q")
    assert merged.returncode == 0, merged.stderr
    assert sorted(os.listdir(tmp_path)) == ["o"] and (tmp_path / "o" / "model.safetensors").is_file()
    bad = cli("inspect", str(tmp_path / "missing"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing" in bad.stderr
    message = subprocess.run(
        [sys.executable, "-c", "from streammerge.cli import _exit_now; _exit_now('gone')"], capture_output=True, text=True
    )
    assert (message.returncode, message.stderr) == (1, "gone\n")
