"""The int4 packed store: manifest entries, record layout and checksums, views, the CLI."""
import json

import pytest
import torch

from klotski.cli import main as cli
from klotski.model.spec import ModelSpec
from klotski.model.weights import CheckpointWeights
from klotski.checkpoint import SafetensorsIndex
from klotski.quant import Int4Weight, quantize_int4
from klotski.store import ChecksumError, ExpertStore, StoreError, convert_checkpoint


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_records_hold_the_quantized_experts(checkpoints, tmp_path, symmetric):
    path, _ = checkpoints.get("qwen2_moe", dtype="bfloat16")
    manifest = convert_checkpoint(path, tmp_path / "s", quantize="int4", group_size=8, symmetric=symmetric)
    assert manifest["quantization"] == {"method": "int4", "bits": 4, "group_size": 8, "symmetric": symmetric,
                                        "scale_dtype": "bfloat16", "source": "rtn"}
    store = ExpertStore(tmp_path / "s")
    weights = CheckpointWeights(SafetensorsIndex(path), ModelSpec.from_pretrained(path))
    spec = weights.spec
    H, I = spec.hidden_size, spec.moe_intermediate_size
    for layer in spec.moe_layers:
        for e in (0, spec.num_experts - 1):
            rec = store.expert(layer, e)
            assert rec.offset % 4096 == 0 and rec.group_size == 8
            names = {t.name.split()[-1]: t for t in rec.tensors}
            want = {"w13": (2 * I, H // 2), "w2": (H, I // 2), "w13_scale": (2 * I, H // 8), "w2_scale": (H, I // 8)}
            if not symmetric:
                want.update(w13_zeros=(2 * I, H // 8), w2_zeros=(H, I // 8))
            assert {k: t.shape for k, t in names.items()} == want
            assert all(t.offset % 16 == 0 for k, t in names.items() if k != "w2")
            w13, w2 = store.read_expert(layer, e, verify=True)
            ref13, ref2 = weights.read_expert(layer, e, torch.float32)
            for got, ref in ((w13, ref13), (w2, ref2)):
                assert isinstance(got, Int4Weight) and got.symmetric == symmetric
                want_q = quantize_int4(ref.float(), 8, symmetric, torch.bfloat16)
                assert torch.equal(got.qweight, want_q.qweight) and torch.equal(got.scales, want_q.scales)


def test_corrupt_int4_scale_is_named(checkpoints, tmp_path):
    path, _ = checkpoints.get("mixtral")
    convert_checkpoint(path, tmp_path / "s", quantize="int4", group_size=16)
    rec = ExpertStore(tmp_path / "s").expert(1, 2)
    with open(rec.path, "r+b") as f:
        f.seek(rec.offset + rec.w2_scale.offset + 1)
        b = f.read(1)
        f.seek(rec.offset + rec.w2_scale.offset + 1)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(ChecksumError, match="layer 1 expert 2 w2_scale"):
        ExpertStore(tmp_path / "s").read_expert(1, 2, verify=True)


def test_manifest_without_zero_points_is_refused(checkpoints, tmp_path):
    path, _ = checkpoints.get("mixtral")
    convert_checkpoint(path, tmp_path / "s", quantize="int4", group_size=16)
    mpath = tmp_path / "s" / "manifest.json"
    m = json.loads(mpath.read_text())
    del m["experts"][0]["tensors"]["w13_zeros"]
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="asymmetric, group 16.*no w13_zeros"):
        ExpertStore(tmp_path / "s")
    m["quantization"]["bits"] = 3
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="unsupported expert quantization"):
        ExpertStore(tmp_path / "s")


def test_cli_convert_quantize(checkpoints, tmp_path, capsys):
    path, _ = checkpoints.get("mixtral")
    assert cli(["convert", path, str(tmp_path / "s"), "--quantize", "int4", "--group-size", "16", "--symmetric",
                "--verify"]) == 0
    out = capsys.readouterr().out
    assert "int4 experts (group 16, symmetric)" in out and "checksums match" in out
    assert ExpertStore(tmp_path / "s").int4["symmetric"] is True
    with pytest.raises(SystemExit):
        cli(["convert", path, str(tmp_path / "t"), "--quantize", "int8"])
