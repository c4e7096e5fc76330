"""Klotski's offloaded experts inside Hugging Face transformers (5.x) models.

    from klotski.integrations.transformers import load_model
    model = load_model("/models/Qwen3-30B-A3B", gpu_memory="8GiB", cpu_memory="16GiB", offload_dir="/nvme/k",
                       device_map="cuda:0", dtype=torch.bfloat16)      # experts never materialised
    model.generate(...)                                                # transformers' own generate
    model.klotski_group.stats()                                        # loads and bytes per tier

transformers 5.x keeps each MoE layer's routed experts in one module (``MixtralExperts``, ...) holding fused
``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I], decorated with
``@use_experts_implementation``: its forward dispatches on ``config._experts_implementation`` to a function
``fn(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` registered in
``ExpertsInterface``. This module registers ``"klotski"`` there (on import); :func:`offload_experts` attaches an
:class:`klotski.experts.OffloadedExperts` to every experts module (as ``module.klotski_experts``), drops the
module's expert weights, removes any accelerate hook from it and switches the model to ``"klotski"``.
Routers, attention, shared experts and dense MLPs stay transformers' own modules, wherever the user (or
``device_map``) put them.

:func:`load_model` builds the model with ``from_pretrained`` (``device_map``, ``dtype`` and the other
arguments as usual) from a model class whose experts modules hold no weights, so the checkpoint's expert
tensors are skipped (never read) and only then offloads the experts.

Only the layout Klotski computes is accepted: concatenated gate/up rows, not transposed, no biases, a gate,
the default gating (act(gate) * up), no post-expert norm, SiLU or tanh-GELU; any other experts class raises
:class:`UnsupportedExpertsError` naming the class and what differs. Model types: those of
:data:`SUPPORTED_MODEL_TYPES`.
"""
from __future__ import annotations

import re

import torch

from klotski.experts import ExpertOffloadGroup, OffloadedExperts, experts_source

IMPLEMENTATION = "klotski"
SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu"}
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
# checkpoint keys of routed experts (per-expert or fused), skipped by load_model
EXPERT_KEYS = r"\.experts\.(\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight|gate_up_proj|down_proj)$"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class UnsupportedExpertsError(ValueError):
    """A model's experts module uses a layout Klotski's offloaded experts do not compute."""


def register() -> None:
    """Add the ``"klotski"`` experts implementation to transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, klotski_experts_forward)


def klotski_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"klotski"`` implementation: the module's attached :class:`OffloadedExperts`."""
    offloaded = getattr(self, "klotski_experts", None)
    if offloaded is None:
        raise RuntimeError(f"{type(self).__name__} has no Klotski experts attached; call "
                           f"klotski.integrations.transformers.offload_experts(model, checkpoint_dir, ...) "
                           f"(or load_model) before selecting experts_implementation={IMPLEMENTATION!r}")
    return offloaded(hidden_states, top_k_index, top_k_weights)


# ---- which modules, and whether Klotski can compute them -------------------------------------------------------
def experts_modules(model: torch.nn.Module) -> list[tuple[str, int, torch.nn.Module]]:
    """(name, decoder layer index, module) of every transformers experts module (``@use_experts_implementation``
    classes), in layer order."""
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "has_gate") and hasattr(module, "is_concatenated") and name.endswith("experts"):
            m = _LAYER.search(name)
            if m is None:
                raise UnsupportedExpertsError(f"experts module {name!r} ({type(module).__name__}) is not under a "
                                              f"'layers.N.' decoder layer")
            found.append((name, int(m.group(1)), module))
    return sorted(found, key=lambda t: t[1])


def unsupported_reasons(module: torch.nn.Module, hidden_act: str | None = None) -> list[str]:
    """What in ``module``'s experts layout Klotski does not compute (empty: supported)."""
    from transformers.integrations.moe import _default_apply_gate

    reasons = []
    if not hasattr(module, "has_gate"):
        return ["it is not a transformers experts class (@use_experts_implementation)"]
    if module.has_bias:
        reasons.append("expert biases")
    if module.is_transposed:
        reasons.append("transposed expert weights")
    if not module.is_concatenated:
        reasons.append("interleaved (non-concatenated) gate/up rows")
    if not module.has_gate:
        reasons.append("experts without a gate projection")
    if module.has_post_expert_norm:
        reasons.append("a post-expert norm")
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        reasons.append("a custom gating function")
    if getattr(module, "_is_expert_parallel", False):
        reasons.append("expert parallelism")
    if hidden_act is not None and hidden_act not in ACTIVATIONS:
        reasons.append(f"activation {hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
    return reasons


def check_supported(module: torch.nn.Module, hidden_act: str | None = None) -> None:
    reasons = unsupported_reasons(module, hidden_act)
    if reasons:
        raise UnsupportedExpertsError(f"{type(module).__name__} cannot use Klotski's offloaded experts: it has "
                                      f"{', '.join(reasons)}; Klotski computes concatenated gate/up [E, 2I, H] + "
                                      f"down [E, H, I] experts without biases (supported model types: "
                                      f"{', '.join(SUPPORTED_MODEL_TYPES)})")


def _hidden_act(config) -> str | None:
    return getattr(config, "hidden_act", None)


def _strip_weights(module: torch.nn.Module) -> None:
    """Drop the module's expert parameters; meta tensors of the same shape and dtype stay as plain attributes
    (so code reading their shapes works, and no state dict, device move or hook sees them)."""
    for name in EXPERT_WEIGHTS:
        p = module._parameters.pop(name, None)
        if p is not None:
            setattr(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))


# ---- offloading an existing model -------------------------------------------------------------------------------
def offload_experts(model, checkpoint_dir: str, *, gpu_memory, cpu_memory, offload_dir: str | None = None,
                    device=None, dtype: torch.dtype | None = None, prefetch: bool = True,
                    prefetch_table: str | None = None) -> ExpertOffloadGroup:
    """Replace the routed experts of every MoE layer of transformers ``model`` (loaded from ``checkpoint_dir``)
    by Klotski's offloaded experts and select the ``"klotski"`` experts implementation.

    ``gpu_memory``: bytes of device expert slots over all MoE layers; ``cpu_memory``: host-resident experts plus
    the disk tier's staging ring; the other experts are read when routed from ``offload_dir``'s packed store
    (converted on first use) or, without ``offload_dir``, from the checkpoint's safetensors files. ``device``:
    where the experts compute (default: each layer's execution device under accelerate's hooks, else the
    device of its router). ``dtype``: compute dtype (default: the model's). Returns the shared group (also
    ``model.klotski_group``); ``model.klotski_group.close()`` stops its loader thread.
    """
    from klotski.checkpoint import SafetensorsIndex
    from klotski.model.spec import ModelSpec
    from klotski.model.weights import CheckpointWeights

    register()
    found = experts_modules(model)
    if not found:
        raise UnsupportedExpertsError(f"{type(model).__name__} has no transformers experts modules "
                                      f"(@use_experts_implementation) to offload")
    model_type = getattr(model.config, "model_type", None)
    for _, _, module in found:
        check_supported(module, _hidden_act(model.config))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedExpertsError(f"{type(model).__name__} (model_type {model_type!r}) is not supported by "
                                      f"Klotski's transformers integration; supported: "
                                      f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    spec = ModelSpec.from_pretrained(checkpoint_dir)
    if spec.model_type != model_type:
        raise ValueError(f"checkpoint {checkpoint_dir} is a {spec.model_type!r} model, the model is {model_type!r}")
    weights = CheckpointWeights(SafetensorsIndex(checkpoint_dir), spec)
    dtype = dtype or _model_dtype(model)
    activation = ACTIVATIONS[_hidden_act(model.config) or "silu"]
    group = ExpertOffloadGroup(len(found), gpu_memory=gpu_memory, cpu_memory=cpu_memory, prefetch=prefetch,
                               prefetch_table=prefetch_table)
    try:
        for name, layer, module in found:
            if getattr(module, "klotski_experts", None) is not None:
                raise ValueError(f"{name} already runs on Klotski's offloaded experts (offload_experts was called "
                                 f"on this model before)")
            shape = (module.num_experts, module.intermediate_dim, module.hidden_dim)
            want = (spec.num_experts, spec.moe_intermediate_size, spec.hidden_size)
            if shape != want:
                raise ValueError(f"{name} ({type(module).__name__}) has [E, I, H] = {list(shape)}, the checkpoint "
                                 f"{checkpoint_dir} {list(want)}")
            where = torch.device(device) if device is not None else _execution_device(model, name, module)
            _check_no_offloading_ancestor(model, name)
            _remove_hooks(module)
            offloaded = OffloadedExperts(experts_source(weights, layer, offload_dir), group=group, device=where,
                                         dtype=dtype, activation=activation, name=name)
            _strip_weights(module)
            module.klotski_experts = offloaded
    except BaseException:
        group.close()
        raise
    model.set_experts_implementation(IMPLEMENTATION)
    model.klotski_group = group
    return group


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _execution_device(model, name: str, module) -> torch.device:
    """Where the experts of ``name`` run: the execution device of the nearest accelerate hook on the module or
    an ancestor, else the device of the MoE block's first real parameter, else the CPU."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    block = model.get_submodule(".".join(parts[:-1]))
    for p in block.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _remove_hooks(module) -> None:
    """Take accelerate's hooks off the experts module and its children (they would move all E experts)."""
    if not any(hasattr(m, "_hf_hook") for m in module.modules()):
        return
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)


def _check_no_offloading_ancestor(model, name: str) -> None:
    """An accelerate hook that places the weights of all its submodules (``place_submodules``) on an ancestor
    would still load the experts' weights from its offload map: refuse, pointing at :func:`load_model`."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        hook = getattr(model.get_submodule(prefix), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "offload", False) and getattr(h, "place_submodules", False):
                raise ValueError(f"module {prefix or type(model).__name__!r} carries an accelerate hook that loads "
                                 f"all its submodules' weights, {name} included; load the model with "
                                 f"klotski.integrations.transformers.load_model(...) instead")


# ---- loading without the experts ------------------------------------------------------------------------------
def load_model(checkpoint_dir: str, *, gpu_memory, cpu_memory, offload_dir: str | None = None, device=None,
               prefetch: bool = True, prefetch_table: str | None = None, model_class=None, **from_pretrained_kwargs):
    """``from_pretrained(checkpoint_dir, **from_pretrained_kwargs)`` (e.g. ``device_map``, ``dtype``,
    ``max_memory``, ``offload_folder``) with the routed experts never loaded, then :func:`offload_experts`.
    ``model_class``: the transformers class (default: ``AutoModelForCausalLM``'s for the config)."""
    import transformers as tf

    register()
    if model_class is None:
        config = tf.AutoConfig.from_pretrained(checkpoint_dir)
        try:
            model_class = tf.AutoModelForCausalLM._model_mapping[type(config)]
        except KeyError:
            raise UnsupportedExpertsError(f"no AutoModelForCausalLM class for {type(config).__name__} "
                                          f"(model_type {config.model_type!r})") from None
    model = _without_expert_weights(model_class).from_pretrained(checkpoint_dir, **from_pretrained_kwargs)
    model.__class__ = model_class  # the subclass only changed __init__
    offload_experts(model, checkpoint_dir, gpu_memory=gpu_memory, cpu_memory=cpu_memory, offload_dir=offload_dir,
                    device=device, prefetch=prefetch, prefetch_table=prefetch_table)
    return model


def _without_expert_weights(model_class):
    """A subclass of ``model_class`` whose experts modules lose their weights right after construction (so
    ``from_pretrained`` skips the checkpoint's expert tensors without reading them)."""

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        for _, _, module in experts_modules(self):
            check_supported(module, _hidden_act(config))
            _strip_weights(module)
        self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | {EXPERT_KEYS}

    return type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__,
                                                       "__qualname__": model_class.__qualname__})


register()  # importing this module makes experts_implementation="klotski" known to transformers
