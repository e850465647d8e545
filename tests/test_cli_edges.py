"""The rough edges a new user hits (issue 15): each of these failed before its fix."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from streammerge.journal import JOURNAL_FILE
from streammerge.lock import output_lock
from tests.conftest import make_llama, make_lora, run_cli

REPO = Path(__file__).parents[1]


def _cli(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streammerge", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[arg-type]
    )


def test_run_on_an_existing_output_suggests_an_option_run_has(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    out, saved = tmp_path / "out", tmp_path / "plan.json"
    assert run_cli("plan", str(llama_base), str(llama_lora), "-o", str(out), "--save", str(saved)).exit_code == 0
    assert run_cli("run", str(saved), "-q").exit_code == 0
    r = run_cli("run", str(saved), "-q")
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = run_cli("run", str(saved), "-q", "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert run_cli("verify", str(out)).exit_code == 0


def test_verify_a_two_adapter_merge_reads_what_it_used_from_the_manifest(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    second = make_lora(llama_base, tmp_path / "second", seed=7, target_modules=["q_proj", "o_proj"])
    out = tmp_path / "out"
    r = run_cli("merge", str(llama_base), str(llama_lora), str(second), "-o", str(out), "--weights", "0.7,0.3", "-q")
    assert r.exit_code == 0, r.stderr
    r = run_cli("verify", str(out), "--against", str(llama_base), str(llama_lora))
    assert r.exit_code == 2 and "the merge used 2 adapter(s)" in r.stderr and "--adapter" in r.stderr
    r = run_cli("verify", str(out), "--against", str(llama_base), str(llama_lora), "--adapter", str(second))
    assert r.exit_code == 0 and "OK" in r.stdout and "tensors recomputed" in r.stdout, r.output
    r = run_cli("verify", str(out), "--recompute")
    assert r.exit_code == 0 and "OK" in r.stdout, r.output
    r = run_cli("verify", str(out), "--against", str(llama_base), str(second), "--adapter", str(llama_lora))  # the other order
    assert r.exit_code == 1 and "differs from a fresh merge" in r.stderr


def test_the_same_adapter_twice_is_refused_unless_weighted(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    r = run_cli("merge", str(llama_base), str(llama_lora), str(llama_lora), "-o", str(tmp_path / "o"), "-q")
    assert r.exit_code == 2 and "given more than once" in r.stderr and "--weights" in r.stderr
    r = run_cli("plan", str(llama_base), str(llama_lora), str(llama_lora) + "/", "-o", str(tmp_path / "o"), "--weights", "0.5,0.5")
    assert r.exit_code == 0 and "is given more than once" in r.stdout


def test_inspect_into_a_closed_pipe_exits_quietly(llama_base: Path) -> None:
    proc = _cli("inspect", str(llama_base), "--tensors")
    assert proc.stdout is not None
    proc.stdout.close()  # `| head` that has read enough
    _, err = proc.communicate(timeout=120)
    assert "Broken pipe" not in err and "Errno" not in err and err == ""
    assert proc.returncode == 141


def test_ctrl_c_names_the_partial_folder_and_the_command_that_continues(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", hidden_size=256, intermediate_size=768, num_hidden_layers=4, vocab_size=4096)
    lora = make_lora(base, tmp_path / "lora")
    out = tmp_path / "out"
    args = ["merge", str(base), str(lora), "-o", str(out), "--tile-size", "64KiB", "-q"]
    proc = _cli(*args, env={"STREAMMERGE_COMMIT_BYTES": "1", "STREAMMERGE_COMMIT_SECONDS": "0"})
    journal = tmp_path / "out.partial" / JOURNAL_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the merge finished before the signal")
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert "OUT.partial" not in line and f"kept in {tmp_path / 'out.partial'}" in line, line
    command = line.split("continue with: ", 1)[1]
    assert command.startswith("streammerge merge ") and command.endswith("--resume")
    argv = shlex.split(command)[1:]
    assert run_cli(*argv).exit_code == 0
    assert run_cli("verify", str(out)).exit_code == 0


def test_swapped_base_and_adapter_get_a_hint(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    r = run_cli("merge", str(llama_lora), str(llama_base), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "did you swap BASE and ADAPTER?" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_merged_4bit_keeps_bitsandbytes_noise_out_of_the_terminal(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    proc = _cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"), "--mode", "merged_4bit")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Failed to load CPU gemm_4bit_forward" not in err and "trust_remote_code" not in err


def test_merge_json_report(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    proc = _cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"), "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out)  # stdout holds the report and nothing else
    assert report["out"] == str(tmp_path / "o") and report["bytes_written"] > 0 and report["seconds"] > 0
    assert report["peak_rss_bytes"] > 0 and report["reads"] in ("direct", "mmap") and report["units"]["merge"] > 0
    assert "wrote " not in err  # no human summary either


def _fake_hub_cache(root: Path, repo: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    entry = root / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(folder, entry / "snapshots" / commit)


def test_hub_ids_resolve_from_the_local_cache(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-llama", llama_base)
    _fake_hub_cache(cache, "someone/tiny-lora", llama_lora, commit="f" * 40)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = _cli("merge", "tiny-org/tiny-llama", "someone/tiny-lora@" + "f" * 40, "-o", str(tmp_path / "o"), "-q", env=env, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    reference = tmp_path / "ref"
    assert run_cli("merge", str(llama_base), str(llama_lora), "-o", str(reference), "-q").exit_code == 0
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    proc = _cli("plan", "tiny-org/missing", "someone/tiny-lora", "-o", str(tmp_path / "p"), env=env, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "tiny-org/missing: no such folder" in err and str(cache) in err and "HF_HUB_OFFLINE" in err, err


def test_a_local_folder_wins_over_a_hub_id(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    (tmp_path / "org").mkdir()
    shutil.copytree(llama_base, tmp_path / "org" / "model")
    proc = _cli("plan", "org/model", str(llama_lora), "-o", str(tmp_path / "p"), env={"HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and str(tmp_path / "org" / "model") in out, err


def test_a_second_merge_into_the_same_output_is_refused(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(str(out)):  # another run holds the output
        r = run_cli("merge", str(llama_base), str(llama_lora), "-o", str(out), "-q")
    assert r.exit_code == 2 and "another streammerge run" in r.stderr and f"pid {os.getpid()}" in r.stderr
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert run_cli("merge", str(llama_base), str(llama_lora), "-o", str(out), "-q").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file goes with the run


def test_two_merges_started_at_once_one_refuses(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", hidden_size=256, intermediate_size=768, num_hidden_layers=4, vocab_size=4096)
    lora = make_lora(base, tmp_path / "lora")
    args = ["merge", str(base), str(lora), "-o", str(tmp_path / "out"), "--tile-size", "64KiB", "-q"]
    procs = [_cli(*args), _cli(*args)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    if codes == [0, 0]:
        pytest.skip("the runs did not overlap")
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "another streammerge run" in refused or "already exists" in refused or "left by an earlier run" in refused
    assert run_cli("verify", str(tmp_path / "out")).exit_code == 0


def test_pyproject_license_is_an_spdx_string() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
