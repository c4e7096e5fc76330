"""The model's chat template: ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named
templates, "default" used) or a ``chat_template.jinja`` file beside it, rendered with jinja2 in a sandbox the
way Hugging Face tokenizers render it (``messages``, ``add_generation_prompt=True``, ``bos_token``,
``eos_token``, ``raise_exception``). The rendered text already holds the special tokens the template writes,
so it is tokenized without adding any.
"""
from __future__ import annotations

import json
import os

from klotski.serve.protocol import ProtocolError

ROLES = ("system", "user", "assistant", "tool", "developer")


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} (AddedToken serialised)
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = ""):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ProtocolError(f"the chat template refused the messages: {message}", param="messages")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"{origin}: the chat template does not parse: {e}") from None
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "ChatTemplate | None":
        """The template of ``model_dir``, or None when it has none."""
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{config_path}: cannot read it: {e}") from None
        source, origin = config.get("chat_template"), config_path
        if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja = os.path.join(model_dir, "chat_template.jinja")
        if not source and os.path.isfile(jinja):
            with open(jinja) as f:
                source, origin = f.read(), jinja
        if not isinstance(source, str) or not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")), origin)

    def render(self, messages) -> str:
        """``messages``: [{"role": ..., "content": str | [{"type": "text", "text": ...}]}]."""
        from jinja2 import TemplateError

        if not isinstance(messages, list) or not messages:
            raise ProtocolError("messages must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ProtocolError(f"messages[{i}] must be an object with a role in {ROLES}, got {m!r:.80}",
                                    param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ProtocolError(f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if content is None and m["role"] == "assistant":
                content = ""
            if not isinstance(content, str):
                raise ProtocolError(f"messages[{i}].content must be a string or text parts, got {content!r:.80}",
                                    param="messages")
            clean.append({"role": m["role"], "content": content})
        try:
            return self.template.render(messages=clean, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except TemplateError as e:
            raise ProtocolError(f"the chat template failed on these messages: {e}", param="messages") from None
