"""``LLM``: the offline entry point (vLLM's convention): load a checkpoint, generate, score logits."""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from klotski.checkpoint import SafetensorsIndex
from klotski.generation import generate_batch, left_pad
from klotski.model import ModelSpec
from klotski.model.expert_selection import ExpertSelection
from klotski.model.weights import CheckpointWeights
from klotski.sampling import SamplingParams
from klotski.session import POLICIES, Session, open_session
from klotski.tokenizer import Tokenizer
from klotski.units import parse_bytes

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}


def resolve_dtype(dtype, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """vLLM-style: a string ("auto", "float32", "bfloat16", "float16") or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype == "auto":
        ckpt = DTYPES.get(spec.torch_dtype, torch.float32)
        # Half precision on CPU is slow and poorly supported: compute in fp32 there.
        return torch.float32 if device.type == "cpu" else ckpt
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device")
    return device


def _text(i: int, prompt) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"prompt {i} is not valid Unicode text: {e.reason} at character {e.start}") from None
    return prompt


def _token_ids(i: int, prompt) -> list[int]:
    """One prompt's token ids: ints only (a float or a string is refused, never coerced)."""
    import numbers

    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise ValueError(f"prompt_token_ids[{i}] must be a list of ints, got {type(prompt).__name__} {prompt!r:.60}")
    if isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.dtype == torch.bool or prompt.dim() != 1:
            raise ValueError(f"prompt_token_ids[{i}] must be a 1-D integer tensor, got {prompt.dtype} "
                             f"{list(prompt.shape)}")
        return [int(t) for t in prompt.tolist()]
    out = []
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"prompt_token_ids[{i}] must hold ints, got {type(t).__name__} {t!r}")
        out.append(int(t))
    return out


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool = True


@dataclass
class RunMetrics:
    generated_tokens: int = 0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    total_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


def _chunk_hook(on_tokens, start: int, size: int):
    """``on_tokens`` over a call's prompt indices, seen from the batch of prompts ``start .. start+size-1``."""

    def hook(tokens: dict[int, int], finished: dict[int, str]) -> list[int]:
        stop = on_tokens({start + r: t for r, t in tokens.items()}, {start + r: f for r, f in finished.items()})
        stop = stop or ()
        return [i - start for i in stop if start <= i < start + size]

    return hook


def _close_session(box: dict) -> None:
    box["session"].close()


class LLM:
    """An MoE model ready to generate.

    ``policy="resident"`` keeps every weight on ``device``; the offloaded policies ("layerwise", "flexgen",
    "klotski") place weights under ``gpu_memory`` / ``cpu_memory`` with the planner, streaming the rest from
    host memory or ``offload_dir``. ``max_num_seqs`` bounds how many prompts share one batch (offloaded: the
    plan's batch group). ``offload_dir`` holds the packed expert store of this checkpoint (converted on first
    use) and the learned prefetch table; a store converted from another checkpoint is refused, naming both,
    unless ``rebuild_store=True`` replaces it. ``quantization="int4"`` (offloaded policies): routed experts
    stored and computed as int4 from the packed store in ``offload_dir`` (see :mod:`klotski.runtime.int4`);
    implied for a pre-quantized GPTQ / AWQ / compressed-tensors checkpoint (whose experts are converted as stored).
    ``prefetch="lookahead"`` (klotski): predict hot experts with the next layer's router on the current residual
    stream as well as the correlation table (:mod:`klotski.lookahead`); the default "table" uses the table only.
    ``hardware``: a :class:`~klotski.hardware.HardwareProfile` to plan with (default: this machine's cached
    profile, refitted by each LLM's first run; an explicit one is never changed).
    ``expert_selection``: "off" (default, exact routing), "lynx:A" or "lynx-offload:A" with A in [0, 1]: on
    decode steps, batch-aware expert selection remaps low-confidence token-expert assignments onto experts
    the batch needs anyway (every token keeps its top-1 and gets top_k experts; prefill is exact); "lynx-offload"
    never drops device-resident, prefetched or already-loading experts, so each drop is a load avoided. See
    :mod:`klotski.model.expert_selection`; ``metrics.extra`` reports remapped assignments and distinct experts
    per layer.
    ``host_compute`` (offloaded): "auto" (default: on a GPU the planner also places attention per phase on the
    CPU over a KV cache in host memory, and computes cold host-resident experts on the CPU when their tokens
    cost less there than a load; nothing changes in CPU mode), "off", or fixed settings: a
    :class:`klotski.program.host.HostCompute` or the same as text, e.g. "decode=cpu,experts=auto"
    (:func:`klotski.program.host.parse_host_compute`).

    Threads: one ``LLM`` may be shared by several threads. Its calls (``generate``, ``logits``, ``close``) are
    serialised by a lock: a call waits until the one running has finished, then runs on its own (requests of
    different threads are not batched together). Lifetime: ``close()`` (or leaving a ``with LLM(...) as llm:``
    block) stops the offloaded runtime's loader threads and drops its weights; an ``LLM`` dropped without
    ``close()`` does the same when it is garbage-collected.
    """

    def __init__(
        self,
        model: str,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "auto",
        policy: str = "resident",
        max_num_seqs: int = 64,
        seed: int = 0,
        gpu_memory: int | str | None = None,
        cpu_memory: int | str | None = None,
        offload_dir: str | None = None,
        num_batches: int | str = "auto",
        batch_size: int | str = "auto",
        rebuild_store: bool = False,
        quantization: str | None = None,
        prefetch: str = "table",
        hardware=None,
        expert_selection: str | None = "off",
        host_compute="auto",
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; available: {', '.join(POLICIES)}")
        selection = ExpertSelection.parse(expert_selection)  # a bad value fails here, before anything loads
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
        for name, value in (("gpu_memory", gpu_memory), ("cpu_memory", cpu_memory)):
            if value is not None:
                parse_bytes(value)  # a bad size is an error under every policy, never silently ignored
        self.model_dir = str(model)
        self.spec = ModelSpec.from_pretrained(self.model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.spec, self.device)
        self.policy = policy
        self.weights = CheckpointWeights(SafetensorsIndex(self.model_dir), self.spec)
        self.tokenizer = Tokenizer(self.model_dir)
        if policy == "resident" and quantization is not None:
            raise ValueError(f"quantization={quantization!r} needs an offloaded policy (klotski, flexgen, "
                             f"layerwise): the int4 experts live in the packed store in offload_dir")
        offload = {} if policy == "resident" else dict(
            gpu_memory=gpu_memory, cpu_memory=cpu_memory, offload_dir=offload_dir, num_batches=num_batches,
            batch_size=batch_size, rebuild_store=rebuild_store, quantization=quantization, prefetch=prefetch,
            hardware=hardware, host_compute=host_compute)
        self._lock = threading.RLock()
        self._box = {"session": open_session(policy, self.weights, self.device, self.dtype, max_num_seqs,
                                             expert_selection=selection, **offload)}
        # closes the session when this LLM is closed, collected or the interpreter exits (never holds self)
        self._finalizer = weakref.finalize(self, _close_session, self._box)
        self.generator = torch.Generator().manual_seed(seed)
        self.metrics = RunMetrics()

    @property
    def session(self) -> Session:
        """What runs the model (:mod:`klotski.session`): plan, executor, metrics, lifecycle."""
        return self._box["session"]

    @session.setter
    def session(self, session: Session) -> None:
        """Replace the session (the caller closes the old one); closed with this LLM."""
        self._box["session"] = session

    @property
    def executor(self):
        """The session's executor (``new_cache`` / ``forward``): the resident model or the offloaded runtime."""
        return self.session.executor

    @property
    def max_num_seqs(self) -> int:
        return self.session.group_size

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers ---------------------------------------------------------------------------------------
    def _prompt_ids(self, prompts, prompt_token_ids) -> list[list[int]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.tokenizer.encode(_text(i, p)) for i, p in enumerate(prompts)]
        else:
            if isinstance(prompt_token_ids, (str, bytes)) or not hasattr(prompt_token_ids, "__iter__"):
                raise ValueError(f"prompt_token_ids must be a list of lists of token ids, got {prompt_token_ids!r:.80}")
            ids = [_token_ids(i, p) for i, p in enumerate(prompt_token_ids)]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {self.spec.vocab_size})")
        return ids

    def _check_request(self, i: int, prompt: list[int], params: SamplingParams) -> None:
        """A request the model can serve: its context fits, its stop tokens exist."""
        limit = self.spec.max_position_embeddings
        if len(prompt) + params.max_tokens > limit:
            raise ValueError(f"prompt {i}: {len(prompt)} prompt tokens + max_tokens {params.max_tokens} exceed "
                             f"the model's context of {limit} tokens (max_position_embeddings)")
        bad = [t for t in params.stop_token_ids or () if t >= self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: stop token id {bad[0]} outside the vocabulary [0, {self.spec.vocab_size})")

    # ---- public API ------------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], sampling_params: SamplingParams) -> None:
        """Raise ValueError (naming the problem) unless ``generate`` can serve this one request: its token ids
        are in the vocabulary, prompt + ``max_tokens`` fit the model's context, its stop tokens exist."""
        ids = self._prompt_ids(None, [prompt_token_ids])
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        self._check_request(0, ids[0], sampling_params)

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool = False,
        on_tokens=None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order; ``.token_ids`` holds only the generated tokens.

        ``on_tokens(tokens, finished)`` (for servers: streaming, cancellation, stop strings): called on the
        calling thread after every decode step with ``tokens`` = {prompt index: token id} for the prompts that
        sampled one and ``finished`` = {prompt index: "stop" | "length"} for those that finished with it; it
        returns the indices to stop now (or None). A stopped prompt's output holds the tokens it had.
        """
        ids = self._prompt_ids(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"got {len(params)} sampling_params for {len(ids)} prompts")
        for i, (p, sp) in enumerate(zip(ids, params)):
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params[{i}] must be a SamplingParams, got {type(sp).__name__}")
            self._check_request(i, p, sp)
        if not ids:
            return []
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=sum(p.max_tokens for p in params), desc="generating", unit="tok")
        with self._lock:
            try:
                return self._generate(ids, params, bar, on_tokens)
            finally:
                if bar:
                    bar.close()

    def _generate(self, ids, params, bar, on_tokens=None) -> list[RequestOutput]:
        self._check_open()
        session = self.session
        session.prepare(ids, [p.max_tokens for p in params])  # re-plan for this workload, warm up
        session.reset_metrics()
        start = time.perf_counter()
        outputs: list[RequestOutput] = []
        group = session.group_size
        for b in range(0, len(ids), group):
            chunk, chunk_params = ids[b : b + group], params[b : b + group]
            new = generate_batch(
                session.executor, chunk, chunk_params, self.spec.eos_token_ids, self.generator,
                on_step=(lambda n: bar.update(n)) if bar else None,
                on_tokens=_chunk_hook(on_tokens, b, len(chunk)) if on_tokens else None,
            )
            outputs += [RequestOutput(p, t, self.tokenizer.decode(t)) for p, t in zip(chunk, new)]
        total_s = time.perf_counter() - start  # the run itself: side-file saves and profile feedback excluded
        session.finish()  # side files (the learned prefetch table in offload_dir), the profile's feedback
        self.metrics = RunMetrics(
            generated_tokens=sum(len(o.token_ids) for o in outputs),
            prompt_tokens=sum(len(p) for p in ids),
            total_s=total_s,
            extra=dict(session.metrics),
        )
        if "prefill_s" in self.metrics.extra:
            self.metrics.prefill_s = self.metrics.extra["prefill_s"]
        return outputs

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this LLM is closed")

    def close(self) -> None:
        """Stop the offloaded runtime's loader threads and drop the weights (idempotent; waits for a call
        running on another thread to finish)."""
        with self._lock:
            self._finalizer()

    def logits(self, prompt_token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, float32 logits [len, vocab] of every position (CPU)."""
        ids = self._prompt_ids(None, prompt_token_ids)
        with self._lock:
            self._check_open()
            for i, p in enumerate(ids):
                if len(p) > self.spec.max_position_embeddings:
                    raise ValueError(f"prompt {i}: {len(p)} tokens exceed the model's context of "
                                     f"{self.spec.max_position_embeddings} tokens (max_position_embeddings)")
            out = []
            group, ex = self.session.group_size, self.session.executor
            for b in range(0, len(ids), group):
                chunk = ids[b : b + group]
                batch, pad = left_pad(chunk)
                cache = ex.new_cache(len(chunk), batch.shape[1], pad)
                logits = ex.forward(batch, cache, all_logits=True).cpu()
                out += [logits[i, int(pad[i]) :] for i in range(len(chunk))]
            return out
