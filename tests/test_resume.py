"""Nothing lost: a run killed at any moment and resumed gives the same bytes as one that never stopped."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streammerge.journal import JOURNAL_FILE, PLAN_FILE
from streammerge.write import KILL_AT_ENV, KILL_POINTS, STOP_AFTER_ENV
from tests.conftest import make_llama, make_lora, run_cli

REPO = Path(__file__).parents[1]


def cli_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streammerge", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("resume")
    base = make_llama(root / "base", hidden_size=128, intermediate_size=352, num_hidden_layers=3, vocab_size=512)
    lora = make_lora(base, root / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    r = run_cli("merge", str(base), str(lora), "-o", str(root / "reference"), "--max-shard-size", "400KB", "-q")
    assert r.exit_code == 0, r.stderr
    return base, lora, digest(root / "reference")


@pytest.mark.parametrize("stop_after", [1, 4, 11, 25])
def test_killed_after_n_units_then_resumed_is_byte_identical(
    model: tuple[Path, Path, dict[str, str]], tmp_path: Path, stop_after: int
) -> None:
    base, lora, reference = model
    out = tmp_path / "out"
    args = [str(base), str(lora), "-o", str(out), "--max-shard-size", "400KB", "-q"]
    proc = cli_process("merge", *args, env={STOP_AFTER_ENV: str(stop_after)})
    proc.communicate(timeout=300)
    assert proc.returncode == 137
    partial = tmp_path / "out.partial"
    assert not out.exists() and partial.is_dir()
    assert len((partial / JOURNAL_FILE).read_text().splitlines()) == stop_after
    r = run_cli("merge", *args)  # without --resume: told what to do
    assert r.exit_code == 2 and "--resume" in r.stderr
    r = run_cli("merge", *args, "--resume")
    assert r.exit_code == 0, r.stderr
    assert digest(out) == reference and not partial.exists()


def test_real_sigkill_mid_run_then_resume(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", hidden_size=256, intermediate_size=768, num_hidden_layers=4, vocab_size=4096)
    lora = make_lora(base, tmp_path / "lora")
    args = [str(base), str(lora), "--max-shard-size", "2MB", "--tile-size", "64KiB", "-q"]
    assert run_cli("merge", *args, "-o", str(tmp_path / "reference")).exit_code == 0
    journal = tmp_path / "out.partial" / JOURNAL_FILE
    proc = cli_process(
        "merge", *args, "-o", str(tmp_path / "out"), env={"STREAMMERGE_COMMIT_BYTES": "1", "STREAMMERGE_COMMIT_SECONDS": "0"}
    )  # journal every unit
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the merge finished before it could be killed")
    r = run_cli("merge", *args, "-o", str(tmp_path / "out"), "--resume")
    assert r.exit_code == 0, r.stderr
    assert digest(tmp_path / "out") == digest(tmp_path / "reference")


def test_resume_refuses_a_different_plan(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    base, lora, _ = model
    args = [str(base), str(lora), "-o", str(tmp_path / "out"), "-q"]
    proc = cli_process("merge", *args, env={STOP_AFTER_ENV: "2"})
    proc.communicate(timeout=300)
    r = run_cli("merge", *args, "--dtype", "fp32", "--resume")
    assert r.exit_code == 2 and "started with other inputs or options" in r.stderr


def test_torn_journal_line_is_redone(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    base, lora, reference = model
    args = [str(base), str(lora), "-o", str(tmp_path / "out"), "--max-shard-size", "400KB", "-q"]
    proc = cli_process("merge", *args, env={STOP_AFTER_ENV: "5"})
    proc.communicate(timeout=300)
    journal = tmp_path / "out.partial" / JOURNAL_FILE
    journal.write_bytes(journal.read_bytes()[:-7])  # the process died while writing the last line
    assert run_cli("merge", *args, "--resume").exit_code == 0
    assert digest(tmp_path / "out") == reference


def test_run_plan_file_with_resume(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    base, lora, reference = model
    plan = tmp_path / "plan.json"
    assert (
        run_cli("plan", str(base), str(lora), "-o", str(tmp_path / "out"), "--max-shard-size", "400KB", "--save", str(plan)).exit_code == 0
    )
    proc = cli_process("run", str(plan), "-q", env={STOP_AFTER_ENV: "7"})
    proc.communicate(timeout=300)
    assert proc.returncode == 137
    r = run_cli("run", str(plan), "--resume")
    assert r.exit_code == 0, r.stderr
    assert "resumed: 7 of" in r.stderr
    assert digest(tmp_path / "out") == reference


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_at_every_writer_phase_then_rerun_is_byte_identical(
    model: tuple[Path, Path, dict[str, str]], tmp_path: Path, point: str
) -> None:
    """Each phase of the writer, in order, killed as by SIGKILL: the same command with --resume
    then finishes (or starts afresh where nothing was done), and never does a half-written OUT appear."""
    base, lora, reference = model
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    args = [str(base), str(lora), "-o", str(out), "--max-shard-size", "400KB", "-q"]
    proc = cli_process("merge", *args, env={KILL_AT_ENV: point, "STREAMMERGE_COMMIT_BYTES": "1", "STREAMMERGE_COMMIT_SECONDS": "0"})
    proc.communicate(timeout=300)
    assert proc.returncode == 137
    if point == "renamed":  # complete and fsynced; only the resume bookkeeping was not removed yet
        assert {k: v for k, v in digest(out).items() if not k.startswith(".")} == reference
        assert run_cli("verify", str(out)).exit_code == 0
        return
    assert not out.exists()
    if point == "draft-made":
        left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".streammerge-lock")]  # the lock itself died with it
        assert not partial.exists() and left == [f"out.partial.draft-{socket.gethostname()}-{proc.pid}"]
    else:
        assert (partial / PLAN_FILE).is_file()  # the partial folder never appears without its plan
    r = run_cli("merge", *args, "--resume")
    assert r.exit_code == 0, r.stderr
    assert digest(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder, no stale draft
