"""A plan's parts as Ray tasks (`merge --ray`, `streammerge.run(plan, engine="ray")`): a local Ray with
two CPUs, a worker killed mid-part and retried, and the same bytes as a run on one machine."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import streammerge
from streammerge import rayrun
from streammerge.errors import PlanMismatch
from tests.conftest import make_llama, make_lora, run_cli

ray = pytest.importorskip("ray")  # in the dev extra; skipped only where Ray cannot be installed

SHARD = "300KB"


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # journal every unit at once, so a killed part's retry has finished work to continue from
    env = {"STREAMMERGE_COMMIT_BYTES": "1", "STREAMMERGE_COMMIT_SECONDS": "0", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("ray")
    base = make_llama(root / "base", hidden_size=128, intermediate_size=352, num_hidden_layers=3, vocab_size=512)
    lora = make_lora(base, root / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    r = run_cli("merge", str(base), str(lora), "-o", str(root / "reference"), "--max-shard-size", SHARD, "-q")
    assert r.exit_code == 0, r.stderr
    return base, lora, digest(root / "reference")


def test_a_part_whose_worker_dies_is_retried_and_the_bytes_are_a_single_runs(
    local_ray: None, model: tuple[Path, Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, lora, reference = model
    plan = streammerge.plan(str(base), [str(lora)], out=str(tmp_path / "out"), max_shard_size=SHARD)
    marker = tmp_path / "killed"
    seen: list[tuple[int, int]] = []
    report = rayrun.run(plan, parts=3, progress=lambda done, total, name: seen.append((done, total)), _kill=(2, 0.5, str(marker)))
    assert marker.exists()  # part 2's worker died (os._exit) half way, after journaling a unit
    assert digest(tmp_path / "out") == reference
    assert any(n.startswith("part 2/3: resumed:") for n in report.notes), report.notes  # the retry continued its journal
    assert "ran as 3 Ray tasks of 2 CPU" in report.notes[-1]
    assert report.bytes_written == sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    total = sum(u.nbytes for u in plan.units)
    assert seen and seen[-1] == (total, total) and all(t == total and 0 <= d <= total for d, t in seen)  # one bar for all parts
    assert not (tmp_path / "out.partial").exists()
    assert "(raylet)" not in capsys.readouterr().out  # Ray's word of the dead worker goes to stderr, not into --json's stdout


def test_merge_with_ray_and_engine_ray(local_ray: None, model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    base, lora, reference = model
    out = tmp_path / "cli"
    saved = tmp_path / "plan.json"
    assert run_cli("plan", str(base), str(lora), "-o", str(out), "--max-shard-size", SHARD, "--save", str(saved)).exit_code == 0
    r = run_cli("merge", "--ray", str(base), str(lora), "-o", str(out), "--max-shard-size", SHARD, "--parts", "2", "--pack")
    assert r.exit_code == 0, r.stderr
    assert digest(out) == reference and "ran as 2 Ray tasks" in r.stderr and "wrote" in r.stderr
    assert "after the merge" in r.stderr  # parts: packed from the finished output
    assert run_cli("unpack", str(tmp_path / "cli.smpack"), "-o", str(tmp_path / "again")).exit_code == 0
    assert digest(tmp_path / "again") == reference
    # a plan of the same output saved before, run on Ray over the finished folder: refused as a whole run refuses it
    r = run_cli("run", str(saved), "--ray", "--parts", "2", "-q")
    assert r.exit_code == 2 and "output folder already exists; pass --overwrite" in r.stderr, r.stderr
    # again over it, through the Python API, with the default number of parts (2 CPUs: one part at a time)
    plan = streammerge.plan(str(base), [str(lora)], out=str(out), max_shard_size=SHARD, overwrite=True)
    report = streammerge.run(plan, engine="ray")
    assert digest(out) == reference and "ran as 1 Ray task of" in report.notes[-1]


def test_bad_input_on_a_worker_is_raised_as_itself_not_retried(
    local_ray: None, model: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    base, lora, _ = model
    plan = streammerge.plan(str(base), [str(lora)], out=str(tmp_path / "out"), max_shard_size=SHARD)
    shard = next(base.glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # changed since planning
    try:
        with pytest.raises(PlanMismatch, match="changed since"):
            rayrun.run(plan, parts=2)
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_resources_come_from_the_plans_estimate(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    base, lora, _ = model
    plan = streammerge.plan(str(base), [str(lora)], out=str(tmp_path / "out"))
    cpu = rayrun.resources(plan, "cpu")
    assert cpu.options() == {"num_cpus": rayrun.MERGE_THREADS, "memory": plan.estimate.peak_host_bytes, "num_gpus": 0}
    gpu = rayrun.resources(plan, "cuda")
    assert gpu.num_gpus == 1 and gpu.num_cpus == 1 and gpu.vram_budget == plan.estimate.peak_device_bytes
    assert rayrun.resources(plan, "cuda", vram_budget=2**30).vram_budget == 2**30


def test_ray_options_that_do_not_go_together_are_refused(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    base, lora, _ = model
    r = run_cli("merge", str(base), str(lora), "-o", str(tmp_path / "o"), "--parts", "2")
    assert r.exit_code == 2 and "--parts is for --ray" in r.stderr
    r = run_cli("plan", str(base), str(lora), "-o", str(tmp_path / "o"), "--save", str(tmp_path / "plan.json"))
    assert r.exit_code == 0, r.stderr
    r = run_cli("run", str(tmp_path / "plan.json"), "--part", "1/2", "--ray")
    assert r.exit_code == 2 and "--ray runs every part itself" in r.stderr
    r = run_cli("run", "--ray", str(tmp_path / "plan.json"), "--part", "1/2")  # an existing path is not an ADDRESS
    assert r.exit_code == 2 and "--ray runs every part itself" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_parts_no_node_can_run_are_refused_before_submitting(model: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    base, lora, _ = model
    plan = streammerge.plan(str(base), [str(lora)], out=str(tmp_path / "out"))
    need = rayrun.resources(plan, "cpu")
    small = [
        {"Alive": True, "Resources": {"CPU": 16.0, "memory": need.memory / 2}},
        {"Alive": False, "Resources": {"CPU": 64.0, "memory": 1e12}},
    ]
    with pytest.raises(streammerge.StreamMergeError, match=r"no Ray node can run a part: .* the largest node has 16 CPU"):
        rayrun._check_feasible(plan, need, small)
    rayrun._check_feasible(plan, need, [{"Alive": True, "Resources": {"CPU": 2.0, "memory": float(need.memory)}}])
    with pytest.raises(streammerge.StreamMergeError, match="1 GPU"):
        rayrun._check_feasible(plan, rayrun.resources(plan, "cuda"), [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e12}}])
