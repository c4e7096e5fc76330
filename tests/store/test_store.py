import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from klotski.checkpoint import SafetensorsIndex
from klotski.io import DiskReader, PinnedRing
from klotski.model.spec import ModelSpec
from klotski.model.weights import CheckpointWeights
from klotski.store import (MANIFEST_NAME, ChecksumError, ExpertStore, StoreError, StoreIncompleteError,
                           convert_checkpoint)

CASES = [("mixtral", "float32", False), ("mixtral", "bfloat16", True),
         ("qwen2_moe", "bfloat16", False), ("qwen2_moe", "float32", True)]


@pytest.mark.parametrize("arch,dtype,fused", CASES)
def test_convert_then_read_back_is_bit_identical(checkpoints, tmp_path, arch, dtype, fused):
    model_dir, _ = checkpoints.get(arch, dtype=dtype, fused=fused)
    out = tmp_path / "store"
    manifest = convert_checkpoint(model_dir, out)
    spec = ModelSpec.from_pretrained(model_dir)
    src = CheckpointWeights(SafetensorsIndex(model_dir), spec)
    store = ExpertStore(out)
    assert store.moe_layers == spec.moe_layers and store.num_experts == spec.num_experts
    assert manifest["source"]["expert_layout"] == ("fused" if fused else "per-expert")
    I, H = spec.moe_intermediate_size, spec.hidden_size
    ring = PinnedRing(2, store.max_record_bytes)
    with DiskReader(mode="DIRECT") as reader:
        for layer in spec.moe_layers:
            for e in range(spec.num_experts):
                ref13, ref2 = src.read_expert(layer, e)
                rec = store.expert(layer, e)
                assert rec.offset % 4096 == 0 and rec.nbytes == ref13.nbytes + ref2.nbytes
                assert rec.w13.shape == (2 * I, H) and rec.w2.shape == (H, I)
                assert rec.w13.dtype == ref13.dtype == getattr(torch, dtype)
                # the runtime's path: one direct request into a ring slot, tensors are views of the slot
                slot = ring.acquire(timeout=5)
                t = reader.read(rec.path, rec.offset, rec.nbytes, into=slot).wait(timeout=10)
                assert t.mode == "DIRECT" and t.view_offset == 0
                w13, w2 = store.views(rec, slot)
                assert torch.equal(w13.view(torch.uint8), ref13.view(torch.uint8))
                assert torch.equal(w2.view(torch.uint8), ref2.view(torch.uint8))
                del w13, w2
                slot.release()
                a13, a2 = store.read_expert(layer, e, reader=reader, verify=True)
                assert torch.equal(a13.view(torch.uint8), ref13.view(torch.uint8))
    # non-expert tensors, under their original names, bit-identical
    ne = SafetensorsIndex(out)
    orig = SafetensorsIndex(model_dir)
    for name in ne.names():
        assert name in orig and "experts." not in name.replace("shared_experts.", "")
        assert torch.equal(ne.read(name).view(-1).view(torch.uint8), orig.read(name).view(-1).view(torch.uint8))
    expected = {n for n in orig.names() if ".experts." not in n or "shared_experts" in n}
    assert set(ne.names()) == expected
    assert ModelSpec.from_pretrained(out) == spec  # config.json copied
    assert store.verify() == len(spec.moe_layers) * spec.num_experts
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_manifest_describes_every_tensor(checkpoints, tmp_path):
    model_dir, _ = checkpoints.get("mixtral", dtype="bfloat16")
    convert_checkpoint(model_dir, tmp_path / "s")
    m = json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())
    rec = m["experts"][0]
    assert {"layer", "expert", "file", "offset", "nbytes", "tensors"} <= set(rec)
    for t in rec["tensors"].values():
        assert {"offset", "nbytes", "dtype", "shape", "checksum"} <= set(t)
        assert t["dtype"] == "bfloat16" and t["checksum"].startswith("crc32:")


def test_bad_checksum_names_the_tensor(checkpoints, tmp_path):
    model_dir, _ = checkpoints.get("mixtral")
    out = tmp_path / "s"
    convert_checkpoint(model_dir, out)
    store = ExpertStore(out)
    rec = store.expert(1, 2)
    with open(rec.path, "r+b") as f:  # flip one byte inside w2
        f.seek(rec.offset + rec.w2.offset + 5)
        b = f.read(1)
        f.seek(rec.offset + rec.w2.offset + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="layer 1 expert 2 w2"):
        store.verify()
    with pytest.raises(ChecksumError, match="layer 1 expert 2 w2"):
        store.read_expert(1, 2, verify=True)
    store.read_expert(1, 1, verify=True)  # others are fine


def test_truncated_or_missing_store_files_are_refused(checkpoints, tmp_path):
    model_dir, _ = checkpoints.get("mixtral")
    out = tmp_path / "s"
    convert_checkpoint(model_dir, out)
    path = ExpertStore(out).expert(0, 0).path
    os.truncate(path, os.path.getsize(path) - 4096)
    with pytest.raises(StoreError, match="truncated"):
        ExpertStore(out)
    with pytest.raises(StoreIncompleteError, match="manifest.json is missing"):
        ExpertStore(tmp_path)
    with pytest.raises(KeyError, match="no expert 99 of layer 0"):
        convert_checkpoint(model_dir, tmp_path / "t") and ExpertStore(tmp_path / "t").expert(0, 99)


KILL_SCRIPT = """
import sys, time
from klotski.store import convert_checkpoint
def progress(what, done, total):
    if what == "experts" and done == 1:
        print("PAUSED", flush=True)
        time.sleep(600)  # killed here, between two layer files
convert_checkpoint(sys.argv[1], sys.argv[2], progress=progress)
"""


def test_killed_conversion_leaves_no_usable_store(checkpoints, tmp_path):
    model_dir, _ = checkpoints.get("mixtral", dtype="bfloat16")
    out = tmp_path / "s"
    convert_checkpoint(model_dir, out)  # an earlier complete store in the same place
    ExpertStore(out)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, model_dir, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "PAUSED"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(StoreIncompleteError, match="interrupted"):
        ExpertStore(out)
    convert_checkpoint(model_dir, out)  # converting again repairs it
    assert ExpertStore(out).verify() > 0
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_cli_convert(checkpoints, tmp_path, capsys):
    from klotski.cli import main

    model_dir, _ = checkpoints.get("qwen2_moe", dtype="bfloat16", fused=True)
    out = tmp_path / "cli"
    assert main(["convert", model_dir, str(out), "--verify"]) == 0
    assert "verified 12 experts" in capsys.readouterr().out and ExpertStore(out).num_experts == 6
    assert main(["convert", str(tmp_path / "missing"), str(out)]) == 2  # a clear error, not a traceback
