"""One sequence's text while it is generated: incremental decoding, stop strings and stream deltas.

The text is the tokenizer's decoding of all the sequence's tokens so far (what ``LLM.generate`` returns as
``.text``), cut before the first stop string when one appears. A stream sends it in deltas; a delta never
ends in a partial character (U+FFFD from an incomplete UTF-8 byte sequence) or in text that could still
become a stop string, so the deltas of a stream joined equal the final text.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class SequenceText:
    """``tokenizer``: :class:`klotski.tokenizer.Tokenizer`; ``stop``: strings that end the sequence (excluded
    from its text, as in the OpenAI API)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.stopped = False  # a stop string appeared; ``text`` ends before it
        self.sent = 0  # characters of ``text`` already handed out by :meth:`delta`

    def update(self, token_ids: list[int]) -> bool:
        """Decode ``token_ids`` (all the sequence's generated tokens); True when a stop string has appeared."""
        if self.stopped:
            return True
        full = self.tokenizer.decode(token_ids)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = full[:cut], True
        else:
            self.text = full
        return self.stopped

    def _held_back(self) -> int:
        """How many trailing characters are not safe to send yet."""
        text = self.text
        keep = len(text) - len(text.rstrip(REPLACEMENT))
        tail = text[: len(text) - keep]
        longest = max((len(s) for s in self.stop), default=0)
        for k in range(min(longest - 1, len(tail)), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stop):
                return keep + k
        return keep

    def delta(self, final: bool = False) -> str:
        """The text not handed out yet (all of it when ``final``, else only what can no longer change)."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out
