"""The packed store of an fp8 block-scaled checkpoint keeps fp8 bytes + scales and reads back the resident
engine's weights."""
import pytest
import torch

from klotski.checkpoint import SafetensorsIndex
from klotski.io import DiskReader, PinnedRing
from klotski.model.quant import Fp8Weight
from klotski.model.spec import ModelSpec
from klotski.model.weights import CheckpointWeights
from klotski.store import ChecksumError, ExpertStore, convert_checkpoint


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_fp8_store_reads_back_what_the_resident_engine_uses(fp8_checkpoints, tmp_path, fused):
    fp8, deq, _ = fp8_checkpoints.get(fused=fused)
    manifest = convert_checkpoint(fp8, tmp_path / "store")
    spec = ModelSpec.from_pretrained(fp8)
    src = CheckpointWeights(SafetensorsIndex(fp8), spec)
    store = ExpertStore(tmp_path / "store")
    assert store.fp8_block == spec.fp8_block == (16, 24) and manifest["dtype"] == "float8_e4m3fn"
    I, H = spec.moe_intermediate_size, spec.hidden_size
    ring = PinnedRing(2, store.max_record_bytes)
    with DiskReader() as reader:
        for layer in spec.moe_layers:
            for e in range(spec.num_experts):
                rec = store.expert(layer, e)
                assert rec.w13_rows == ((2 * I,) if fused else (I, I))
                stored13, stored2 = src.read_expert_stored(layer, e)
                # one read into a ring slot, then Fp8Weight views of it (the runtime's path)
                slot = ring.acquire(timeout=5)
                t = reader.read(rec.path, rec.offset, rec.nbytes, into=slot).wait(timeout=10)
                v13, v2 = store.views(rec, slot, t.view_offset)
                assert isinstance(v13, Fp8Weight) and v13.weight.dtype == torch.float8_e4m3fn
                for view, ref in ((v13, stored13), (v2, stored2)):
                    assert torch.equal(view.weight.view(torch.uint8), ref.weight.view(torch.uint8))
                    assert torch.equal(view.scale_inv, ref.scale_inv)
                # dequantized: exactly the resident engine's weights (fp32 and bf16)
                for dtype in (torch.float32, torch.bfloat16):
                    ref13, ref2 = src.read_expert(layer, e, dtype)
                    assert torch.equal(v13.dequantize(torch.empty(2 * I, H, dtype=dtype)), ref13)
                    assert torch.equal(v2.dequantize(torch.empty(H, I, dtype=dtype)), ref2)
                del v13, v2
                slot.release()
                a13, a2 = store.read_expert(layer, e, reader=reader, verify=True)
                assert torch.equal(a2.dequantize(), src.read_expert(layer, e)[1])
    # about half the bytes of a bf16 store of the same model
    bf16_bytes = 3 * I * H * 2
    assert max(r.nbytes for r in store.records()) < 0.6 * bf16_bytes
    # scales of the experts travel in the records; the other fp8 weights keep theirs in non_expert
    names = set(SafetensorsIndex(tmp_path / "store").names())
    assert not any(".experts." in n and "shared" not in n for n in names)
    assert "model.layers.1.self_attn.o_proj.weight_scale_inv" in names


def test_corrupt_scale_is_named(fp8_checkpoints, tmp_path):
    fp8, _, _ = fp8_checkpoints.get()
    convert_checkpoint(fp8, tmp_path / "store")
    store = ExpertStore(tmp_path / "store")
    rec = store.expert(1, 2)
    with open(rec.path, "r+b") as f:
        f.seek(rec.offset + rec.w2_scale.offset)
        byte = f.read(1)
        f.seek(rec.offset + rec.w2_scale.offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="layer 1 expert 2 w2_scale"):
        ExpertStore(tmp_path / "store").read_expert(1, 2, verify=True)
