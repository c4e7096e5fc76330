"""Lazy safetensors index and the expert key layouts: reads only what is asked, clear errors otherwise."""
import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from klotski import checkpoint as ck
from klotski.checkpoint import CheckpointError, SafetensorsIndex
from klotski.model import ModelSpec, UnsupportedModelError
from klotski.model.weights import CheckpointWeights


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("fused,sharded", [(False, False), (True, True)])
def test_index_reads_every_tensor_exactly(checkpoints, fused, sharded):
    path, _ = checkpoints.get("mixtral", fused=fused, sharded=sharded)
    index = SafetensorsIndex(path)
    reference = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            reference.update(load_file(os.path.join(path, f)))
    assert set(index.names()) == set(reference)
    for name, t in reference.items():
        assert torch.equal(index.read(name), t), name


@pytest.mark.parametrize("fused", [False, True])
def test_read_expert_reads_only_that_experts_bytes(checkpoints, monkeypatch, fused):
    path, hf = checkpoints.get("qwen3_moe", fused=fused)
    weights = CheckpointWeights(SafetensorsIndex(path), ModelSpec.from_pretrained(path))
    read_bytes = []
    real = ck.read_tensor
    monkeypatch.setattr(ck, "read_tensor", lambda info, out=None: read_bytes.append(info.nbytes) or real(info, out))
    w13, w2 = weights.read_expert(1, 5)
    spec = weights.spec
    expert_bytes = 3 * spec.hidden_size * spec.moe_intermediate_size * 4
    assert sum(read_bytes) == expert_bytes
    experts = hf.model.layers[1].mlp.experts
    assert torch.equal(w13, experts.gate_up_proj[5].detach())
    assert torch.equal(w2, experts.down_proj[5].detach())


def test_fused_and_per_expert_layouts_give_identical_experts(checkpoints):
    a = CheckpointWeights(SafetensorsIndex(checkpoints.get("olmoe")[0]), ModelSpec.from_pretrained(checkpoints.get("olmoe")[0]))
    pb = checkpoints.get("olmoe", fused=True, sharded=True)[0]
    b = CheckpointWeights(SafetensorsIndex(pb), ModelSpec.from_pretrained(pb))
    assert a.layout.fused is False and b.layout.fused is True
    for layer in (0, 1):
        for x, y in zip(a.read_experts(layer), b.read_experts(layer)):
            assert torch.equal(x, y)


def test_missing_shard_is_named(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints.get("mixtral", fused=True, sharded=True)[0], tmp_path / "m")
    victim = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, victim))
    with pytest.raises(FileNotFoundError, match=victim):
        SafetensorsIndex(path)


def test_no_safetensors_at_all(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        SafetensorsIndex(str(tmp_path))


@pytest.mark.parametrize("keep", [4, 8, 40])
def test_truncated_header(checkpoints, tmp_path, keep):
    path = copy_ckpt(checkpoints.get("mixtral")[0], tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsIndex(path)


def test_truncated_data_names_the_tensor(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints.get("mixtral")[0], tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[:-100])
    with pytest.raises(CheckpointError, match=r"tensor '.*' ends at byte .* \(truncated\)"):
        SafetensorsIndex(path)


def test_corrupt_header_json(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsIndex(str(tmp_path))


def test_wrong_shape_names_tensor_file_and_shapes(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints.get("mixtral")[0], tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"k_proj.weight' in .*model.safetensors: expected shape \[32, 64\], got \[31, 64\]"):
        CheckpointWeights(SafetensorsIndex(path), ModelSpec.from_pretrained(path))


def test_missing_and_extra_tensors(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints.get("olmoe")[0], tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    save_file(tensors, f)
    with pytest.raises(CheckpointError) as e:
        CheckpointWeights(SafetensorsIndex(path), ModelSpec.from_pretrained(path))
    assert "missing tensor 'model.layers.0.mlp.experts.3.up_proj.weight'" in str(e.value)
    assert "unexpected tensor 'model.layers.0.mlp.surprise.weight'" in str(e.value)


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'llama'; supported: .*mixtral.*olmoe"):
        ModelSpec.from_pretrained(str(tmp_path))


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelSpec.from_pretrained(str(tmp_path))


def test_llm_construction_fails_before_loading_on_bad_checkpoint(checkpoints, tmp_path, monkeypatch):
    from klotski import LLM

    path = copy_ckpt(checkpoints.get("mixtral")[0], tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors["lm_head.weight"]
    save_file(tensors, f)
    reads = []
    monkeypatch.setattr(ck, "read_tensor", lambda *a, **k: reads.append(1))
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        LLM(path, device="cpu")
    assert reads == []  # validated from headers alone: nothing was half-loaded
