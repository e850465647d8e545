"""streammerge pack / unpack: byte-grouped zstd, restored byte for byte and checked against the manifest."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from safetensors.torch import save_file

from streammerge import pack as packing
from streammerge.errors import BadCheckpoint
from tests.conftest import make_llama, make_lora, run_cli


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pack")
    base = make_llama(root / "base", hidden_size=128, intermediate_size=352, num_hidden_layers=2, vocab_size=512)
    lora = make_lora(base, root / "lora")
    r = run_cli(
        "merge", str(base), str(lora), "-o", str(root / "merged"), "--max-shard-size", "400KB", "-q", "--pack", "--tile-size", "64KiB"
    )
    assert r.exit_code == 0, r.stderr
    assert "packed" in r.stderr and "from the merge's stream" in r.stderr  # compressed as the tiles were written
    return root / "merged"


def test_merge_pack_then_unpack_is_byte_identical_and_checked(merged: Path, tmp_path: Path) -> None:
    packed = merged.with_name("merged.smpack")  # written by merge --pack
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in packed.glob("*.smz")) == [s + ".smz" for s in shards]
    r = run_cli("unpack", str(packed), "-o", str(tmp_path / "again"))
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((merged / "streammerge-manifest.json").read_text())
    assert f"{len(manifest['tensors'])} tensors match the manifest's CRC-32" in r.stderr
    assert digest(tmp_path / "again") == digest(merged)
    assert run_cli("verify", str(tmp_path / "again")).exit_code == 0


def test_progress_follows_the_bytes_and_quiet_is_silent(merged: Path, tmp_path: Path) -> None:
    """pack and unpack report every raw byte once, in order, to the last; `-q` prints nothing, the default a bar and a summary."""
    raw = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    for run in (
        lambda bar: packing.pack(merged, tmp_path / "p", chunk_bytes=64 * 2**10, threads=2, progress=bar),
        lambda bar: packing.unpack(tmp_path / "p", tmp_path / "u", threads=2, progress=bar),
    ):
        calls: list[tuple[int, int, str]] = []
        run(lambda done, total, name, calls=calls: calls.append((done, total, name)))
        done = [c[0] for c in calls]
        assert len(calls) > 4 and done == sorted(done) and done[-1] == raw and {c[1] for c in calls} == {raw}
        assert "header" in {c[2] for c in calls} and "model.layers.1.mlp.down_proj.weight" in {c[2] for c in calls}
    quiet = run_cli("pack", str(merged), "-o", str(tmp_path / "q"), "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    loud = run_cli("unpack", str(tmp_path / "q"), "-o", str(tmp_path / "q2"))
    assert loud.exit_code == 0 and "unpacking 100%" in loud.stderr and loud.stderr.rstrip().splitlines()[-1].startswith("unpacked ")
    assert digest(tmp_path / "q2") == digest(merged)


def test_byte_groups_beat_plain_zstd_on_bf16(merged: Path, tmp_path: Path) -> None:
    raw = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    plain = sum(len(zstandard.ZstdCompressor(level=3).compress(p.read_bytes())) for p in merged.glob("*.safetensors"))
    report = packing.pack(merged, tmp_path / "p")
    assert report.raw_bytes == raw
    assert raw / report.packed_bytes > 1.25  # the exponent byte of bf16 compresses; random weights give ~1.4
    assert report.packed_bytes < 0.95 * plain  # and grouping is what does it


def test_every_dtype_and_odd_tensors_round_trip_without_a_manifest(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(300, 77, generator=g).to(torch.bfloat16),
        "f16": torch.randn(1001, generator=g).to(torch.float16),
        "f32": torch.randn(64, 33, generator=g),
        "f64": torch.randn(7, generator=g).to(torch.float64),
        "i8": torch.randint(-128, 127, (999,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (5, 3), dtype=torch.uint8, generator=g),
        "f8": torch.randn(100, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "special_bf16": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -1e-40], dtype=torch.bfloat16),
        "special_f64": torch.tensor([float("nan"), -float("inf"), -0.0, 5e-324, -1.0], dtype=torch.float64),
    }
    src = tmp_path / "m"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text("{}")
    for threads, chunk in ((1, 1000), (4, 64), (3, 2**20)):  # chunks smaller than a tensor, and odd
        dest = tmp_path / f"p{threads}"
        packing.pack(src, dest, threads=threads, chunk_bytes=chunk)
        out = packing.unpack(dest, tmp_path / f"u{threads}")
        assert digest(tmp_path / f"u{threads}") == digest(src) and out.checked_tensors == 0
    # the same input gives the same pack, whatever the number of threads
    a, b = (packing.pack(src, tmp_path / f"d{t}", threads=t, chunk_bytes=1000) for t in (1, 4))
    assert (Path(a.dest) / "model.safetensors.smz").read_bytes() == (Path(b.dest) / "model.safetensors.smz").read_bytes()
    index = packing.read_index(str(tmp_path / "d1" / "model.safetensors.smz"))
    widths = {c["tensor"]: c["width"] for c in index["chunks"]}
    assert widths["bf16"] == 2 and widths["f32"] == 4 and widths["i8"] == 1 and widths["f8"] == 1 and "empty" not in widths


def test_damage_is_found_and_named(merged: Path, tmp_path: Path) -> None:
    packing.pack(merged, tmp_path / "p")
    smz = sorted((tmp_path / "p").glob("*.smz"))[0]
    index = packing.read_index(str(smz))
    # little-endian bf16: plane 0 holds the low (mantissa) bytes, stored raw; plane 1 the sign and exponent, zstd
    chunk = next(c for c in index["chunks"] if c["tensor"] and [p[2] for p in c["planes"]] == ["raw", "zstd"])
    offset = chunk["planes"][0][0] + 5  # a byte inside the raw mantissa plane: only the CRC-32 can tell
    data = bytearray(smz.read_bytes())
    data[offset] ^= 0x40
    smz.write_bytes(bytes(data))
    r = run_cli("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    assert r.exit_code == 2 and smz.name in r.stderr and chunk["tensor"] in r.stderr and "CRC-32" in r.stderr
    assert not (tmp_path / "u").exists() and not (tmp_path / "u.partial").exists()
    data[offset] ^= 0x40
    data[chunk["planes"][1][0] + 9] ^= 0xFF  # inside the exponent plane's zstd frame
    smz.write_bytes(bytes(data))
    r = run_cli("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    assert r.exit_code == 2 and chunk["tensor"] in r.stderr, r.stderr
    smz.write_bytes(bytes(data[:-100]))  # truncated
    r = run_cli("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    assert r.exit_code == 2 and "truncated or damaged" in r.stderr
    with pytest.raises(BadCheckpoint, match="not a streammerge pack file"):
        packing.read_index(str(merged / "config.json"))


def test_a_manifest_that_disagrees_is_refused(merged: Path, tmp_path: Path) -> None:
    packing.pack(merged, tmp_path / "p")
    path = tmp_path / "p" / "streammerge-manifest.json"
    manifest = json.loads(path.read_text())
    name = sorted(manifest["tensors"])[3]
    manifest["tensors"][name]["crc32"] ^= 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(BadCheckpoint, match=f"tensor {name} unpacks to CRC-32"):
        packing.unpack(tmp_path / "p", tmp_path / "u")


def test_existing_destinations_are_refused(merged: Path, tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    r = run_cli("pack", str(merged), "-o", str(tmp_path / "p"))
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = run_cli("pack", str(merged), "-o", str(tmp_path / "p"), "--overwrite", "--threads", "2")
    assert r.exit_code == 0 and "x) in" in r.stderr, r.stderr


def test_memory_is_bounded_by_the_window() -> None:
    made = []

    def jobs() -> Iterator[int]:
        for i in range(50):
            made.append(i)
            yield i

    for i, (job, result) in enumerate(packing._ordered(jobs(), lambda j: j * 2, threads=3)):
        assert job == i and result == 2 * i
        assert len(made) - i <= 6  # never more than 2 x threads chunks read ahead of the writer


def _rewrite_index(smz: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Replace the index of ``smz`` by ``change(index)``, keeping the chunks' bytes as they are."""
    data = smz.read_bytes()
    (n,) = struct.unpack("<Q", data[-16:-8])
    index = json.loads(data[-16 - n : -16])
    change(index)
    text = json.dumps(index).encode()
    smz.write_bytes(data[: -16 - n] + text + struct.pack("<Q", len(text)) + packing.TAIL)


def _tensor_chunk(index: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in index["chunks"] if c["width"] == 2)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda index: _tensor_chunk(index).__setitem__(key, value)


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "width 0": (_set("width", 0), "width 0"),
    "width 3": (_set("width", 3), "width 3"),
    "huge chunk": (_set("n", 2**40), "is not an integer in"),
    "chunk length a string": (_set("n", "12"), "is not an integer"),
    "gap": (_set("at", 1), "starts at byte 1"),
    "plane past the end": (lambda i: _tensor_chunk(i)["planes"][1].__setitem__(1, 2**31), "is not an integer in"),
    "plane before the start": (lambda i: _tensor_chunk(i)["planes"][0].__setitem__(0, 0), "is not an integer in"),
    "unknown codec": (lambda i: _tensor_chunk(i)["planes"][0].__setitem__(2, "lz4"), "is not [offset, length"),
    "one plane missing": (lambda i: _tensor_chunk(i)["planes"].pop(), "planes of width 2"),
    "size lies": (lambda i: i.__setitem__("size", i["size"] + 8), "chunks cover"),
    "no chunks": (lambda i: i.__setitem__("chunks", {}), "no list of chunks"),
    "wrong format": (lambda i: i.__setitem__("format", "zip"), "pack format 'zip'"),
    "tensor renamed": (_set("tensor", "other"), "does not match the pack index"),
    "planes swapped": (lambda i: _tensor_chunk(i)["planes"].reverse(), "CRC-32"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pack_indexes_are_refused_in_one_line(case: str, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    src = tmp_path / "m"
    src.mkdir()
    tensors = {"a.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16), "model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}
    save_file(tensors, str(src / "model.safetensors"))
    packing.pack(src, tmp_path / "p", chunk_bytes=4096)
    change, message = HOSTILE[case]
    _rewrite_index(tmp_path / "p" / "model.safetensors.smz", change)
    r = run_cli("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    assert r.exit_code == 2 and message in r.stderr and "model.safetensors.smz" in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()  # the progress lines so far, then the error in one line
    assert lines[-1].startswith("streammerge: error: ") and all(line.startswith("unpacking ") for line in lines[:-1])
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "u").exists() and not (tmp_path / "u.partial").exists()


def test_a_frame_that_lies_about_its_size_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    save_file({"a": torch.zeros(4096, dtype=torch.bfloat16)}, str(src / "model.safetensors"))
    packing.pack(src, tmp_path / "p")
    smz = tmp_path / "p" / "model.safetensors.smz"
    index = packing.read_index(str(smz))
    chunk = _tensor_chunk(index)
    offset, length, codec = chunk["planes"][1]
    assert codec == "zstd"
    bomb = zstandard.ZstdCompressor().compress(bytes(2**24))  # says 16 MiB, in a few hundred bytes
    data = smz.read_bytes()
    (n,) = struct.unpack("<Q", data[-16:-8])
    body = data[:offset] + bomb + data[offset + length : -16 - n]
    chunk["planes"][1] = [offset, len(bomb), "zstd"]
    for c in index["chunks"]:
        for p in c["planes"]:
            if p[0] > offset:
                p[0] += len(bomb) - length
    text = json.dumps(index).encode()
    smz.write_bytes(body + text + struct.pack("<Q", len(text)) + packing.TAIL)
    with pytest.raises(BadCheckpoint, match=r"the frame says 16777216 bytes, expected 4096"):
        packing.unpack(tmp_path / "p", tmp_path / "u")


def test_bad_folders_and_manifests_are_refused(merged: Path, tmp_path: Path) -> None:
    r = run_cli("pack", str(merged), "-o", str(merged / "inside"))
    assert r.exit_code == 2 and "must not be" in r.stderr
    r = run_cli("pack", str(merged), "--level", "40", "-o", str(tmp_path / "x"))
    assert r.exit_code == 2 and "zstd level 40" in r.stderr
    packing.pack(merged, tmp_path / "p")
    (tmp_path / "p" / "tokenizer.json").symlink_to("/etc/hostname")
    r = run_cli("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    assert r.exit_code == 2 and "a link" in r.stderr
    (tmp_path / "p" / "tokenizer.json").unlink()
    manifest_path = tmp_path / "p" / "streammerge-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tensors"][sorted(manifest["tensors"])[0]] = "nope"
    manifest_path.write_text(json.dumps(manifest))
    r = run_cli("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    assert r.exit_code == 2 and "no file and CRC-32" in r.stderr
    del manifest["tensors"][sorted(manifest["tensors"])[0]]
    manifest_path.write_text(json.dumps(manifest))
    r = run_cli("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    assert r.exit_code == 2 and "is not in the manifest" in r.stderr


def test_streamed_pack_of_a_requantized_merge_and_of_a_resumed_one(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from streammerge.write import STOP_AFTER_ENV
    from tests.quantized_fixtures import make_llama_4bit

    base = make_llama_4bit(tmp_path / "base", hidden_size=128, intermediate_size=352, num_hidden_layers=2, vocab_size=512)
    lora = make_lora(base, tmp_path / "lora")
    out = tmp_path / "m4"
    # merged_4bit writes packed codes and their statistics (small writes), and copies untouched tensors
    r = run_cli("merge", str(base), str(lora), "-o", str(out), "--mode", "merged_4bit", "-q", "--pack", "--max-shard-size", "300KB")
    assert r.exit_code == 0 and "from the merge's stream" in r.stderr, r.stderr
    r = run_cli("unpack", str(tmp_path / "m4.smpack"), "-o", str(tmp_path / "u4"))
    assert r.exit_code == 0 and digest(tmp_path / "u4") == digest(out), r.stderr
    # killed part way, then resumed with --pack: packed from the finished output instead
    args = [str(base), str(lora), "-o", str(tmp_path / "r"), "-q", "--pack", "--max-shard-size", "300KB"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), STOP_AFTER_ENV: "3"}
    proc = subprocess.run([sys.executable, "-m", "streammerge", "merge", *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 137 and not (tmp_path / "r.smpack").exists()  # a SIGKILL leaves r.smpack.partial, as r.partial
    r = run_cli("merge", *args, "--resume")
    assert r.exit_code == 0 and "after the merge" in r.stderr, r.stderr
    assert not (tmp_path / "r.smpack.partial").exists()
    r = run_cli("unpack", str(tmp_path / "r.smpack"), "-o", str(tmp_path / "ur"))
    assert r.exit_code == 0 and digest(tmp_path / "ur") == digest(tmp_path / "r"), r.stderr
    r = run_cli("merge", *args)  # the packed folder exists: refused before any work, as the output is
    assert r.exit_code == 2 and "already exists" in r.stderr


def test_a_stream_packer_that_missed_bytes_refuses_to_finish(tmp_path: Path) -> None:
    import streammerge
    from streammerge.errors import OutputError

    base = make_llama(tmp_path / "base")
    lora = make_lora(base, tmp_path / "lora")
    plan = streammerge.plan(str(base), [str(lora)], out=str(tmp_path / "out"))
    packer = packing.StreamPacker(plan, str(tmp_path / "out.smpack"), threads=2)
    shard = plan.shards[0]
    packer.add(0, shard.size - 64, bytes(64))  # the last 64 bytes only: a gap after the header
    with pytest.raises(OutputError, match="gap at byte"):
        packer.finish(str(tmp_path))
    packer.abort()
    assert not (tmp_path / "out.smpack").exists() and not (tmp_path / "out.smpack.partial").exists()
