"""A plan run in parts (`streammerge run plan.json --part K/N`): any order, in parallel, killed and
resumed, always the same bytes as a single run; `finish` says what is missing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streammerge import parts
from streammerge.errors import StreamMergeError
from streammerge.lock import output_lock, part_lock
from streammerge.plan.model import Plan
from streammerge.write import STOP_AFTER_ENV
from tests.conftest import make_llama, make_lora, run_cli

REPO = Path(__file__).parents[1]


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def cli_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streammerge", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("parts")
    base = make_llama(root / "base", hidden_size=128, intermediate_size=352, num_hidden_layers=3, vocab_size=512)
    lora = make_lora(base, root / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    r = run_cli("merge", str(base), str(lora), "-o", str(root / "reference"), "--max-shard-size", "300KB", "-q")
    assert r.exit_code == 0, r.stderr
    return base, lora, digest(root / "reference")


def save_plan(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> Path:
    base, lora, _ = model
    plan = tmp_path / "plan.json"
    r = run_cli("plan", str(base), str(lora), "-o", str(tmp_path / "out"), "--max-shard-size", "300KB", "--save", str(plan))
    assert r.exit_code == 0, r.stderr
    return plan


def test_split_is_balanced_deterministic_and_covers_every_shard(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    p = Plan.load(save_plan(model, tmp_path))
    shards = len(p.shards)
    assert shards >= 4
    for n in range(1, shards + 1):
        split = parts.split(p, n)
        assert split == parts.split(Plan.load(tmp_path / "plan.json"), n)  # same parts from a reloaded plan
        assert sorted(s for owned in split for s in owned) == list(range(shards)) and all(split)
        units = [i for k in range(1, n + 1) for i in parts.part(p, k, n).units]
        assert sorted(units) == list(range(len(p.units)))
        loads = [sum(p.shards[s].size for s in owned) for owned in split]
        assert max(loads) - min(loads) <= max(s.size for s in p.shards)  # greedy: within one shard of even
    with pytest.raises(StreamMergeError, match=f"at most {shards} parts"):
        parts.split(p, shards + 1)
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(StreamMergeError, match="K/N"):
            parts.parse(bad)


def test_parts_in_any_order_give_the_single_run_bytes(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    plan = save_plan(model, tmp_path)
    out = tmp_path / "out"
    for k in (3, 1):
        r = run_cli("run", str(plan), "--part", f"{k}/3", "-q")
        assert r.exit_code == 0, r.stderr
        assert not out.exists()
    r = run_cli("finish", str(plan))  # refused, naming the part left and the command
    assert r.exit_code == 2
    assert "1 of 3 parts not finished: 2/3 (0 of" in r.stderr and f"streammerge run {plan} --part K/3" in r.stderr
    r = run_cli("run", str(plan), "--part", "2/3", "-q")
    assert r.exit_code == 0, r.stderr
    assert "part 2/3: wrote" in r.stderr and "all 3 parts done" in r.stderr
    assert digest(out) == model[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plan.json"]  # no partial folder, no lock files left
    r = run_cli("run", str(plan), "--part", "2/3")  # a finished part again: nothing to do
    assert r.exit_code == 0 and "already complete, nothing to do" in r.stderr
    assert run_cli("finish", str(plan)).stderr.strip().endswith("is already complete")
    assert digest(out) == model[2]


def test_parts_in_parallel_processes(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    plan = save_plan(model, tmp_path)
    procs = [cli_process("run", str(plan), "--part", f"{k}/4", "-q") for k in (1, 2, 3, 4)]
    results = [(p.wait(timeout=300), p.communicate()[1].decode()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0, 0, 0], results
    assert sum("all 4 parts done" in err for _, err in results) == 1  # assembled exactly once
    assert digest(tmp_path / "out") == model[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plan.json"]


def test_a_killed_part_is_continued_by_running_it_again(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    plan = save_plan(model, tmp_path)
    p = Plan.load(plan)
    assert run_cli("run", str(plan), "--part", "2/2", "-q").exit_code == 0
    proc = cli_process("run", str(plan), "--part", "1/2", "-q", env={STOP_AFTER_ENV: "3"})
    proc.communicate(timeout=300)
    assert proc.returncode == 137
    partial = tmp_path / "out.partial"
    journal = partial / parts.journal_file(1, 2)
    assert len(journal.read_text().splitlines()) == 3 and not (tmp_path / "out").exists()
    r = run_cli("finish", str(plan))
    assert r.exit_code == 2 and f"1/2 (3 of {len(parts.part(p, 1, 2).units)} units done)" in r.stderr
    r = run_cli("run", str(plan), "--part", "1/2")  # the same command again: no --resume needed
    assert r.exit_code == 0, r.stderr
    assert "resumed: 3 of" in r.stderr and "all 2 parts done" in r.stderr
    assert digest(tmp_path / "out") == model[2]
    assert run_cli("verify", str(tmp_path / "out")).exit_code == 0


def test_the_last_part_killed_before_assembling_is_finished_by_finish(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    plan = save_plan(model, tmp_path)
    assert run_cli("run", str(plan), "--part", "1/2", "-q").exit_code == 0
    proc = cli_process("run", str(plan), "--part", "2/2", "-q", env={"STREAMMERGE_TEST_KILL_AT": "files-copied"})
    proc.communicate(timeout=300)
    assert proc.returncode == 137 and not (tmp_path / "out").exists()
    r = run_cli("finish", str(plan))
    assert r.exit_code == 0 and "all 2 parts done" in r.stderr, r.stderr
    assert digest(tmp_path / "out") == model[2]


def test_mixing_whole_runs_and_splits_is_refused(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    plan = save_plan(model, tmp_path)
    assert run_cli("run", str(plan), "--part", "1/3", "-q").exit_code == 0
    r = run_cli("run", str(plan), "--part", "1/2", "-q")
    assert r.exit_code == 2 and "was started in 3 parts" in r.stderr and "--part K/3" in r.stderr
    assert "run the same command again" not in r.stderr  # it would fail the same way: only the way out is said
    r = run_cli("run", str(plan), "--resume", "-q")
    assert r.exit_code == 2 and "was started in 3 parts" in r.stderr
    base, lora, _ = model  # a different plan for the same output
    other = tmp_path / "other.json"
    run_cli("plan", str(base), str(lora), "-o", str(tmp_path / "out"), "--max-shard-size", "300KB", "--dtype", "fp32", "--save", str(other))
    r = run_cli("run", str(other), "--part", "2/3", "-q")
    assert r.exit_code == 2 and "was started with another plan" in r.stderr
    with part_lock(str(tmp_path / "out"), "2/3"):  # part 2 is running elsewhere
        r = run_cli("run", str(plan), "--part", "2/3", "-q")
    assert r.exit_code == 2 and "part 2/3 is already running" in r.stderr
    with output_lock(str(tmp_path / "out"), shared=True):  # parts are running: a whole run must wait
        r = run_cli("run", str(plan), "--overwrite", "-q")
    assert r.exit_code == 2 and "parts of a split run" in r.stderr
    r = run_cli("run", str(plan), "--overwrite", "-q")  # no part running: a whole run may start over
    assert r.exit_code == 0, r.stderr
    assert digest(tmp_path / "out") == model[2]


def plan_with_adapter_copy(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the adapter (to change after planning) and the saved plan that merges it: (adapter folder, plan file)."""
    base, lora, _ = model
    work = tmp_path / "lora"
    work.mkdir()
    for f in lora.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    plan = tmp_path / "plan.json"
    r = run_cli("plan", str(base), str(work), "-o", str(tmp_path / "out"), "--max-shard-size", "300KB", "--save", str(plan))
    assert r.exit_code == 0, r.stderr
    return work, plan


def test_a_part_refuses_changed_inputs(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    work, plan = plan_with_adapter_copy(model, tmp_path)
    os.utime(work / "adapter_model.safetensors", ns=(1, 1))
    r = run_cli("run", str(plan), "--part", "1/2", "-q")
    assert r.exit_code == 2 and "input changed since the plan was made" in r.stderr


def test_a_part_refuses_an_edited_adapter_config(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """lora_alpha is in the plan's scales: an adapter_config.json edited after planning is an input changed."""
    work, plan = plan_with_adapter_copy(model, tmp_path)
    config = work / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": ', '"lora_alpha": 1'))
    for args in (["--part", "1/2"], []):
        r = run_cli("run", str(plan), *args, "-q")
        assert r.exit_code == 2 and f"{config}: input changed since the plan was made" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_of_another_plan_is_not_taken_as_complete(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """OUT finished by a merge with other options (here --weights 1): plan B's parts (--weights 0.5) must not call it done."""
    base, lora, _ = model
    out = tmp_path / "out"
    plan = tmp_path / "b.json"
    assert (
        run_cli(
            "plan", str(base), str(lora), "-o", str(out), "--max-shard-size", "300KB", "--weights", "0.5", "--save", str(plan)
        ).exit_code
        == 0
    )
    assert run_cli("merge", str(base), str(lora), "-o", str(out), "--max-shard-size", "300KB", "-q").exit_code == 0
    for args in (["run", str(plan), "--part", "1/2", "-q"], ["finish", str(plan)]):
        r = run_cli(*args)
        assert "already complete" not in r.stderr and r.exit_code == 2, r.stderr
    assert digest(out) == model[2]  # the other merge's output is left as it was


def test_python_api_runs_parts(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    import streammerge

    p = Plan.load(save_plan(model, tmp_path))
    reports = [streammerge.run(p, part=(k, 2)) for k in (2, 1)]
    assert reports[0].bytes_written == parts.part(p, 2, 2).bytes(p)
    assert any("all 2 parts done" in n for n in reports[1].notes)
    assert digest(tmp_path / "out") == model[2]
