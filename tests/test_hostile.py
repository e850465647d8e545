"""Hostile inputs end to end: links out of the folder, and mutated headers through plan + run.

Whatever a mutated checkpoint holds, streammerge either refuses it with a StreamMergeError or
merges it correctly; it never raises anything else and never writes outside the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streammerge
from streammerge.errors import StreamMergeError
from tests.conftest import load_folder, make_llama, make_lora, run_cli


def test_shard_linking_out_of_the_folder_is_refused(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for f in llama_base.iterdir():
        shutil.copy(f, base / f.name)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(base / "model.safetensors", outside)
    os.symlink(outside, base / "model.safetensors")
    r = run_cli("plan", str(base), str(llama_lora), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "is a link to" in r.stderr and "outside" in r.stderr


def test_hugging_face_cache_snapshot_links_are_accepted(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in llama_base.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    p = streammerge.plan(snapshot, [str(llama_lora)], out=tmp_path / "out")
    streammerge.run(p)
    assert sorted(load_folder(tmp_path / "out")) == sorted(load_folder(llama_base))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hostile")
    base = make_llama(root / "base", hidden_size=32, intermediate_size=48, num_hidden_layers=1, vocab_size=64)
    return base, make_lora(base, root / "lora", r=4, target_modules=["q_proj", "down_proj"])


edits = st.lists(
    st.tuples(
        st.sampled_from(["begin", "end", "shape0", "dtype", "drop", "rename"]),
        st.integers(0, 1000),
        st.integers(-70, 70),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits)
def test_mutated_headers_are_refused_or_merged(small: tuple[Path, Path], tmp_path: Path, changes: list[tuple[str, int, int]]) -> None:
    base_src, lora = small
    work = tmp_path / f"case-{abs(hash(tuple(changes)))}"
    base = work / "base"
    shutil.copytree(base_src, base)
    shard = base / "model.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    for what, pick, delta in changes:
        name = names[pick % len(names)]
        entry = header.get(name)
        if entry is None:
            continue
        if what == "begin":
            entry["data_offsets"][0] = max(0, entry["data_offsets"][0] + delta)
        elif what == "end":
            entry["data_offsets"][1] = max(0, entry["data_offsets"][1] + delta)
        elif what == "shape0" and entry["shape"]:
            entry["shape"][0] = max(0, entry["shape"][0] + delta)
        elif what == "dtype":
            entry["dtype"] = ["F32", "F16", "BF16", "U8", "I64"][pick % 5]
        elif what == "drop":
            del header[name]
        elif what == "rename":
            header[name + ".x"] = header.pop(name)
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    shard.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    before = sorted(str(p) for p in work.rglob("*"))
    out = work / "out"
    try:
        report = streammerge.run(streammerge.plan(base, [str(lora)], out=out))
    except StreamMergeError:
        assert not out.exists()
    else:
        assert out.is_dir() and report.bytes_written > 0
        load_folder(out)  # the safetensors library accepts what we wrote
    after = sorted(str(p) for p in work.rglob("*") if not str(p).startswith(str(out)))
    assert after == before  # nothing written anywhere else (inputs untouched, no stray partial folder)
