"""A policy planned alone is planned as ``compare`` plans it: klotski's search also starts from layerwise's and
flexgen's best points and tries FlexGen's order there, so ``LLM(policy="klotski")`` never runs a plan predicted
slower than flexgen's, and it runs the plan ``klotski plan`` shows.

Found with the demo: planned alone, klotski's coarse scan and climb stopped at 16 x 4 while flexgen's best was
64 x 1, so the demo's klotski row ran the slowest of the three. On the presets (prompt 512 / generate 32 and
128 / 8, five models x seven presets) 13 of 70 unseeded klotski searches ended below flexgen's rate, among
them Mixtral-8x7B on the RTX 3090 (52.2 vs 53.0 tokens/s).
"""
from klotski.costs import ModelCosts
from klotski.hardware import PRESETS
from klotski.planner import Planner
from klotski.presets import model_config

MODEL, HW = "qwen1.5-moe-a2.7b", "t4"


def _costs():
    return ModelCosts.from_config(model_config(MODEL), name=MODEL)


def test_a_policy_planned_alone_is_the_compared_plan():
    costs, hw = _costs(), PRESETS[HW]
    klotski = Planner(costs, hw, 128, 8).plan("klotski")
    flexgen = Planner(costs, hw, 128, 8).plan("flexgen")
    assert klotski.tokens_per_s >= flexgen.tokens_per_s * (1 - 1e-9), (klotski.tokens_per_s, flexgen.tokens_per_s)
    compared = Planner(costs, hw, 128, 8).compare(("layerwise", "flexgen", "klotski"))
    assert klotski == compared["klotski"] and flexgen == compared["flexgen"]

