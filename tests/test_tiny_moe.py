"""The trained tiny MoE shipped in klotski/assets/tiny_moe: loads in klotski, matches transformers, and is
prepared for the demo from the package."""
import json
import os
import shutil

import pytest
import torch

import klotski.demo as demo
from klotski.tokenizer import Tokenizer

ASSET = demo.ASSET_DIR


def test_shipped_checkpoint_is_small_and_complete():
    sizes = {f: os.path.getsize(os.path.join(ASSET, f)) for f in demo.ASSET_FILES}
    assert sum(sizes.values()) < 16 * 2**20
    cfg = json.loads(open(os.path.join(ASSET, "config.json")).read())
    assert cfg["model_type"] == "mixtral" and cfg["num_experts_per_tok"] == 2 and cfg["num_local_experts"] >= 8
    report = json.loads(open(os.path.join(ASSET, "train_report.json")).read())
    assert report["val_ppl"] < report["unigram_ppl"] / 2


def test_greedy_tokens_equal_transformers():
    from transformers import AutoModelForCausalLM

    tok = Tokenizer(ASSET)
    prompt = tok.encode("def __init__(self")
    assert prompt[0] == 0 and tok.decode(prompt) == "def __init__(self"
    hf = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=1)[0, len(prompt):].tolist()
    from klotski import LLM, SamplingParams

    llm = LLM(ASSET, device="cpu", dtype="float32")
    try:
        out = llm.generate(prompt_token_ids=[prompt],
                           sampling_params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    finally:
        llm.close()
    assert out.token_ids == ref


def test_demo_copies_the_shipped_model_and_refreshes_an_outdated_copy(tmp_path, monkeypatch):
    src = tmp_path / "asset"
    shutil.copytree(ASSET, src)
    monkeypatch.setattr(demo, "ASSET_DIR", str(src))
    path = demo.ensure_demo_checkpoint("default", str(tmp_path / "cache" / "m"))
    assert set(demo.ASSET_FILES) <= set(os.listdir(path))
    first = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert demo.ensure_demo_checkpoint("default", path) == path  # current: not copied again
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == first
    with open(src / "model.safetensors", "ab") as f:  # the shipped weights changed (retrained)
        f.write(b"\0")
    demo.ensure_demo_checkpoint("default", path)
    assert os.path.getsize(os.path.join(path, "model.safetensors")) == os.path.getsize(src / "model.safetensors")
    assert os.listdir(tmp_path / "cache") == ["m"]


def test_missing_shipped_model_names_the_rebuild_command(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "ASSET_DIR", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="train_tiny_moe.py"):
        demo.ensure_demo_checkpoint("default", str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")
