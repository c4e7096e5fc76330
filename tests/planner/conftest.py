import pytest

from klotski.costs import ModelCosts


def tiny_config(layers=2, experts=2, top_k=1, hidden=64, inter=128):
    return {"model_type": "mixtral", "vocab_size": 100, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": experts, "num_experts_per_tok": top_k, "torch_dtype": "bfloat16"}


@pytest.fixture
def tiny_costs():
    return ModelCosts.from_config(tiny_config(), name="tiny")


@pytest.fixture
def make_tiny_config():
    return tiny_config
