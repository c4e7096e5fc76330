"""Text <-> token ids through the checkpoint's ``tokenizer.json`` (the ``tokenizers`` library)."""
from __future__ import annotations

import os


class Tokenizer:
    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, "tokenizer.json")
        self.path = path
        self._tok = None
        if os.path.isfile(path):
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._tok = HFTokenizer.from_file(path)
            except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
                raise ValueError(f"{path}: cannot load the tokenizer ({e}); fix or remove the file "
                                 f"(token ids can be passed without one)") from None

    @property
    def available(self) -> bool:
        return self._tok is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens=False`` for text that already holds them (a rendered chat template)."""
        if self._tok is None:
            raise FileNotFoundError(
                f"text prompts need a tokenizer, but {self.path} does not exist; pass prompt_token_ids instead"
            )
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        if self._tok is None:
            return ""
        return self._tok.decode(ids, skip_special_tokens=True)
