"""``LLM``: the offline entry point (vLLM's convention): load a checkpoint, generate, score logits."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from klotski.checkpoint import SafetensorsIndex
from klotski.generation import generate_batch, left_pad
from klotski.model import ModelSpec
from klotski.model.resident import ResidentModel
from klotski.model.weights import CheckpointWeights
from klotski.sampling import SamplingParams
from klotski.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}
POLICIES = ("resident", "layerwise", "flexgen", "klotski")


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
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device")
    return device


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


class LLM:
    """An MoE model ready to generate.

    ``policy="resident"`` keeps every weight on ``device``. ``max_num_seqs`` bounds how many prompts share
    one batch. ``quantization="int4"`` (offloaded policies): routed experts stored and computed as int4 from the
    packed store in ``offload_dir`` (see :mod:`klotski.runtime.int4`).
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
        quantization: str | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; available: {', '.join(POLICIES)}")
        self.model_dir = str(model)
        self.spec = ModelSpec.from_pretrained(self.model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.spec, self.device)
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.weights = CheckpointWeights(SafetensorsIndex(self.model_dir), self.spec)
        self.tokenizer = Tokenizer(self.model_dir)
        if policy == "resident":
            if quantization is not None:
                raise ValueError(f"quantization={quantization!r} needs an offloaded policy (klotski, flexgen, "
                                 f"layerwise): the int4 experts live in the packed store in offload_dir")
            self.executor = ResidentModel(self.weights, self.device, self.dtype)
        else:  # offloaded: klotski.runtime places weights under the budgets; a batch group per generate chunk
            from klotski.runtime import build_offloaded

            self.executor = build_offloaded(self.weights, self.device, self.dtype, policy, gpu_memory, cpu_memory,
                                            offload_dir, num_batches=num_batches, batch_size=batch_size,
                                            quantization=quantization)
            self.max_num_seqs = self.executor.group_size
        self.generator = torch.Generator().manual_seed(seed)
        self.metrics = RunMetrics()

    # ---- helpers ---------------------------------------------------------------------------------------
    def _prompt_ids(self, prompts, prompt_token_ids) -> list[list[int]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.tokenizer.encode(p) for p in prompts]
        else:
            ids = [list(map(int, p)) for p in prompt_token_ids]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {self.spec.vocab_size})")
        return ids

    # ---- public API ------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in order; ``.token_ids`` holds only the generated tokens."""
        ids = self._prompt_ids(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"got {len(params)} sampling_params for {len(ids)} prompts")
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=sum(p.max_tokens for p in params), desc="generating", unit="tok")
        offloaded = self.policy != "resident"
        if offloaded:  # the runtime re-plans for this workload if it differs a lot, warms the prefetcher up
            from klotski.runtime import prepare_run

            self.executor = prepare_run(self.executor, ids, [p.max_tokens for p in params])
            self.max_num_seqs = self.executor.group_size
        if hasattr(self.executor, "reset_metrics"):
            self.executor.reset_metrics()
        start = time.perf_counter()
        outputs: list[RequestOutput] = []
        for b in range(0, len(ids), self.max_num_seqs):
            chunk, chunk_params = ids[b : b + self.max_num_seqs], params[b : b + self.max_num_seqs]
            new = generate_batch(
                self.executor, chunk, chunk_params, self.spec.eos_token_ids, self.generator,
                on_step=(lambda n: bar.update(n)) if bar else None,
            )
            outputs += [RequestOutput(p, t, self.tokenizer.decode(t)) for p, t in zip(chunk, new)]
        if bar:
            bar.close()
        if offloaded:  # save the learned prefetch table next to the model / in offload_dir
            from klotski.runtime import finish_run

            finish_run(self.executor)
        self.metrics = RunMetrics(
            generated_tokens=sum(len(o.token_ids) for o in outputs),
            prompt_tokens=sum(len(p) for p in ids),
            total_s=time.perf_counter() - start,
            extra=dict(getattr(self.executor, "metrics", {})),
        )
        if "prefill_s" in self.metrics.extra:
            self.metrics.prefill_s = self.metrics.extra["prefill_s"]
        return outputs

    def close(self) -> None:
        """Stop the offloaded runtime's loader threads (no-op for the resident policy)."""
        if hasattr(self.executor, "close"):
            self.executor.close()

    def logits(self, prompt_token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, float32 logits [len, vocab] of every position (CPU)."""
        ids = self._prompt_ids(None, prompt_token_ids)
        out = []
        for b in range(0, len(ids), self.max_num_seqs):
            chunk = ids[b : b + self.max_num_seqs]
            batch, pad = left_pad(chunk)
            cache = self.executor.new_cache(len(chunk), batch.shape[1], pad)
            logits = self.executor.forward(batch, cache, all_logits=True).cpu()
            out += [logits[i, int(pad[i]) :] for i in range(len(chunk))]
        return out
