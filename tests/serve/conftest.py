"""Fixtures of the server tests: the trained tiny MoE shipped in ``klotski/assets/tiny_moe`` (a real tokenizer,
so text prompts and chat work), with a chat template, and the same model in-process as the reference."""
import json
import os

import pytest

from klotski.demo import ASSET_DIR

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """The tiny MoE (files linked) plus a tokenizer_config.json holding a chat template (CHAT_TEMPLATE: a
    small ChatML-like one, where Hugging Face checkpoints keep theirs)."""
    d = tmp_path_factory.mktemp("tiny-chat")
    for name in os.listdir(ASSET_DIR):
        os.symlink(os.path.join(ASSET_DIR, name), d / name)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    return str(d)


@pytest.fixture(scope="session")
def reference_llm():
    """The same model in-process: what the server's answers must equal."""
    from klotski import LLM

    llm = LLM(ASSET_DIR, device="cpu", dtype="float32")
    yield llm
    llm.close()
