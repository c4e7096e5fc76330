"""OpenAI request bodies -> prompts and :class:`~klotski.SamplingParams`; the response bodies.

Fields mapped (OpenAI names): ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``, ``top_p``,
``seed``, ``stop`` (a string or a list of strings), ``stream``, ``stream_options.include_usage``, ``n`` (1
only). Extensions as vLLM spells them: ``stop_token_ids``, ``top_k``, ``ignore_eos``. Every choice carries
the generated ``token_ids`` (a stream chunk: the tokens of that chunk). Fields this server cannot honour
(``n`` > 1, ``best_of`` > 1, ``logprobs``, ``echo``, ``suffix``, penalties, ``logit_bias``, tools) are refused
with a 400 naming them, never ignored; other unknown fields are ignored, as the OpenAI server does.
"""
from __future__ import annotations

import numbers
import time
import uuid
from dataclasses import dataclass, field

from klotski.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI completions API's default


class ProtocolError(Exception):
    """A request refused with ``status`` and a message naming the field (``param``)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "service_unavailable"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ParsedRequest:
    """One request: its prompts (token ids), one SamplingParams for all of them, its stop strings."""

    prompts: list[list[int]]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    request_id: str = ""
    chat: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _refuse_unsupported(body: dict) -> None:
    checks = [
        ("n", lambda v: v is not None and v != 1, "n must be 1: one choice per prompt is supported"),
        ("best_of", lambda v: v is not None and v != 1, "best_of must be 1"),
        ("logprobs", lambda v: v not in (None, False, 0), "logprobs are not supported"),
        ("top_logprobs", lambda v: v not in (None, 0), "top_logprobs are not supported"),
        ("echo", lambda v: bool(v), "echo is not supported"),
        ("suffix", lambda v: v not in (None, ""), "suffix is not supported"),
        ("presence_penalty", lambda v: v not in (None, 0), "presence_penalty is not supported (use 0)"),
        ("frequency_penalty", lambda v: v not in (None, 0), "frequency_penalty is not supported (use 0)"),
        ("logit_bias", lambda v: bool(v), "logit_bias is not supported"),
        ("tools", lambda v: bool(v), "tools are not supported"),
        ("response_format", lambda v: v not in (None, {"type": "text"}), "response_format is not supported"),
    ]
    for name, bad, why in checks:
        if name in body and bad(body[name]):
            raise ProtocolError(f"{why}; got {name}={body[name]!r}", param=name)


def check_model(body: dict, served: str) -> None:
    model = body.get("model", served)
    if model != served:
        raise ProtocolError(f"the model {model!r} is not served here; this server serves {served!r} "
                            f"(GET /v1/models)", status=404, param="model", code="model_not_found")


def _stop_fields(body: dict) -> tuple[tuple[str, ...], list[int] | None]:
    stop = body.get("stop")
    if stop is None:
        strings: tuple[str, ...] = ()
    elif isinstance(stop, str):
        strings = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        strings = tuple(stop)
    else:
        raise ProtocolError(f"stop must be a string or a list of strings, got {stop!r:.80}", param="stop")
    if any(not s for s in strings):
        raise ProtocolError("stop strings must not be empty", param="stop")
    ids = body.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(_is_int(t) for t in ids)):
        raise ProtocolError(f"stop_token_ids must be a list of token ids, got {ids!r:.80}", param="stop_token_ids")
    return strings, ids


def _sampling(body: dict, max_tokens, stop_token_ids) -> SamplingParams:
    """SamplingParams from the OpenAI fields; its own checks' messages name the field."""
    kwargs = dict(max_tokens=max_tokens, stop_token_ids=stop_token_ids)
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", -1), ("seed", None),
                          ("ignore_eos", False)):
        value = body.get(name)
        kwargs[name] = default if value is None else value
    if not isinstance(kwargs["ignore_eos"], bool):
        raise ProtocolError(f"ignore_eos must be true or false, got {kwargs['ignore_eos']!r}", param="ignore_eos")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise ProtocolError(str(e), param=param if param in kwargs else None) from None


def _stream_fields(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ProtocolError(f"stream must be true or false, got {stream!r}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ProtocolError(f"stream_options must be an object, got {opts!r:.80}", param="stream_options")
    return stream, bool(opts.get("include_usage", False))


def _prompts(prompt, tokenizer) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ProtocolError(f"prompt must be a string, a list of strings or a list of token ids, got {prompt!r:.80}",
                            param="prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if not tokenizer.available:
                raise ProtocolError("this model has no tokenizer.json: send prompts as token ids", param="prompt")
            out.append(tokenizer.encode(p))
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            out.append([int(t) for t in p])
        else:
            raise ProtocolError(f"prompt[{i}] must be a non-empty string or list of token ids, got {p!r:.80}",
                                param="prompt")
    return out


def parse_completion(body: dict, tokenizer) -> ParsedRequest:
    """``POST /v1/completions``."""
    _refuse_unsupported(body)
    if "prompt" not in body:
        raise ProtocolError("prompt is required", param="prompt")
    prompts = _prompts(body["prompt"], tokenizer)
    stop, stop_ids = _stop_fields(body)
    max_tokens = body.get("max_tokens")
    params = _sampling(body, DEFAULT_COMPLETION_MAX_TOKENS if max_tokens is None else max_tokens, stop_ids)
    stream, usage = _stream_fields(body)
    if stop and not tokenizer.available:
        raise ProtocolError("stop strings need the model's tokenizer.json; use stop_token_ids", param="stop")
    return ParsedRequest(prompts, params, stop, stream, usage, f"cmpl-{uuid.uuid4().hex}")


def parse_chat(body: dict, tokenizer, template, context: int) -> ParsedRequest:
    """``POST /v1/chat/completions``: ``template`` is the model's :class:`~klotski.serve.chat.ChatTemplate`
    (None: refused); ``max_tokens`` defaults to the rest of the model's ``context``."""
    _refuse_unsupported(body)
    if template is None:
        raise ProtocolError("this model has no chat template (no chat_template in its tokenizer_config.json "
                            "or chat_template.jinja): use /v1/completions", param="messages",
                            code="no_chat_template")
    prompt = tokenizer.encode(template.render(body.get("messages")), add_special_tokens=False)
    stop, stop_ids = _stop_fields(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max(1, context - len(prompt))
    params = _sampling(body, max_tokens, stop_ids)
    stream, usage = _stream_fields(body)
    return ParsedRequest([prompt], params, stop, stream, usage, f"chatcmpl-{uuid.uuid4().hex}", chat=True)


# ---- responses -------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(req: ParsedRequest, model: str, results: list[dict]) -> dict:
    """``results``: the "done" event of each prompt (:class:`klotski.serve.batcher.Sequence`)."""
    choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"],
                "token_ids": r["token_ids"]} for i, r in enumerate(results)]
    return {"id": req.request_id, "object": "text_completion", "created": req.created, "model": model,
            "choices": choices, "usage": usage(sum(r["prompt_tokens"] for r in results),
                                               sum(len(r["token_ids"]) for r in results))}


def chat_body(req: ParsedRequest, model: str, result: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]}, "logprobs": None,
              "finish_reason": result["finish_reason"], "token_ids": result["token_ids"]}
    return {"id": req.request_id, "object": "chat.completion", "created": req.created, "model": model,
            "choices": [choice], "usage": usage(result["prompt_tokens"], len(result["token_ids"]))}


def completion_chunk(req: ParsedRequest, model: str, index: int, text: str, token_ids: list[int],
                     finish_reason: str | None = None) -> dict:
    return {"id": req.request_id, "object": "text_completion", "created": req.created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                         "token_ids": token_ids}]}


def chat_chunk(req: ParsedRequest, model: str, delta: dict, token_ids: list[int],
               finish_reason: str | None = None) -> dict:
    return {"id": req.request_id, "object": "chat.completion.chunk", "created": req.created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
                         "token_ids": token_ids}]}


def usage_chunk(req: ParsedRequest, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": req.request_id, "object": obj, "created": req.created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
