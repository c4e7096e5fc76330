"""bench/quality/train_tiny_moe.py's command line: its defaults still build the shipped checkpoint's model, and
``--experts`` / ``--intermediate`` / ``--top-k`` build a wider MoE with the same active parameters per token."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "quality"))

from train_tiny_moe import main, model_config, parse_args  # noqa: E402

ASSET = os.path.join(os.path.dirname(__file__), "..", "klotski", "assets", "tiny_moe")
FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef")


def test_defaults_build_the_shipped_model():
    shipped = json.loads(open(os.path.join(ASSET, "config.json")).read())
    report = json.loads(open(os.path.join(ASSET, "train_report.json")).read())
    args = parse_args(report["command"].split()[2:])
    assert args.top_k == 2
    assert {k: v for k, v in vars(args).items() if k != "top_k"} == report["args"]
    cfg = model_config(shipped["vocab_size"], args).to_dict()
    assert {f: cfg[f] for f in FIELDS} == {f: shipped[f] for f in FIELDS}


def test_top_k_and_experts_set_the_routing_shape():
    cfg = model_config(2048, parse_args(["--experts", "32", "--top-k", "4", "--intermediate", "112"]))
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (32, 4, 112)
    shipped = model_config(2048, parse_args([]))  # same active expert parameters per token: 4 x 112 = 2 x 224
    assert cfg.num_experts_per_tok * cfg.intermediate_size == shipped.num_experts_per_tok * shipped.intermediate_size


@pytest.mark.parametrize("top_k", ["0", "9"])
def test_top_k_outside_the_experts_is_refused_before_training(top_k, tmp_path):
    with pytest.raises(SystemExit, match="--top-k must be in"):
        main(["--top-k", top_k, "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
