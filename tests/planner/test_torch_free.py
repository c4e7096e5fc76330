"""The planning side (costs, planner, schedule, simulator, `klotski plan`'s module) imports without torch."""
import subprocess
import sys

CODE = """
import sys
from klotski.costs import ModelCosts, weight_dtype_of
from klotski.presets import model_config
import klotski.cli.plan, klotski.planner, klotski.schedule, klotski.simulate
config = model_config("deepseek-v3")  # fp8 block-scaled: sized through the block-scale shapes
costs = ModelCosts.from_config(config, name="deepseek-v3", weight_dtype=weight_dtype_of(config))
assert costs.layers and costs.layers[-1].expert_bytes > 0
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, f"planning imported torch: {bad[:5]}"
"""


def test_planning_side_imports_without_torch():
    subprocess.run([sys.executable, "-c", CODE], check=True)
