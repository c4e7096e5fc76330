"""Model layer: architecture specs (``spec``), config parsers per family, and the torch math of one layer."""
from klotski.model.spec import PARSERS, ModelSpec, RopeSpec, UnsupportedModelError
from klotski.model import architectures  # noqa: F401  (registers mixtral, qwen2_moe, qwen3_moe, olmoe)
from klotski.model import deepseek  # noqa: F401  (registers deepseek_v2/v3)

__all__ = ["ModelSpec", "RopeSpec", "UnsupportedModelError", "PARSERS"]
