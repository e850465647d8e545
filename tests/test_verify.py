"""``streammerge verify``: headers, index, sizes, recorded checksums, and recomputation from the inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from streammerge.verify import verify
from tests.conftest import make_llama, make_lora, run_cli


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    base = make_llama(root / "base")
    lora = make_lora(base, root / "lora")
    r = run_cli("merge", str(base), str(lora), "-o", str(root / "out"), "--max-shard-size", "60KB", "--verify", "-q")
    assert r.exit_code == 0 and "OK" in r.output, r.output + r.stderr
    return base, lora, root / "out"


def copy_of(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    return target


def test_intact_output_verifies_with_recomputation(merged: tuple[Path, Path, Path]) -> None:
    base, lora, out = merged
    report = verify(out, against=(str(base), [str(lora)]), sample=4)
    assert report.ok, report.problems
    assert report.checksummed == report.tensors == 21 and report.recomputed == 5


def test_a_flipped_byte_is_found_and_named(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = merged
    damaged = copy_of(out, tmp_path)
    manifest = json.loads((damaged / "streammerge-manifest.json").read_text())
    name, entry = next((n, e) for n, e in manifest["tensors"].items() if "q_proj" in n)
    shard = damaged / entry["file"]
    data = bytearray(shard.read_bytes())
    data[entry["offset"] + 3] ^= 0x40
    shard.write_bytes(data)
    r = run_cli("verify", str(damaged))
    assert r.exit_code == 1 and "FAILED" in r.output
    assert name in r.stderr and "CRC-32" in r.stderr


def test_wrong_merge_is_found_by_recomputation(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, _, out = merged
    other = make_lora(base, tmp_path / "other", seed=9)
    report = verify(out, against=(str(base), [str(other)]), sample=3)
    assert not report.ok and "differs from a fresh merge" in report.problems[0]


def test_truncated_shard_and_bad_index(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = merged
    damaged = copy_of(out, tmp_path)
    index = json.loads((damaged / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 2
    (damaged / "model.safetensors.index.json").write_text(json.dumps(index))
    report = verify(damaged)
    assert not report.ok and "total_size" in report.problems[0]
    shard = sorted(damaged.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    r = run_cli("verify", str(damaged))
    assert r.exit_code == 1 and shard.name in r.stderr


def test_folder_without_manifest_checks_structure_only(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base")
    report = verify(base)
    assert report.ok and report.checksummed == 0 and "checksums not" in report.notes[0]
    r = run_cli("verify", str(tmp_path / "missing"))
    assert r.exit_code == 2
