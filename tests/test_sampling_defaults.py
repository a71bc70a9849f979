"""One default step count per method: the pipeline's fallback for an export without a sampling section, the recipe
type's own default and every built-in recipe of the method agree (issue 13: each method's default is the one its
steps curves placed, docs/benchmarks.md "Quality vs sampling steps"; a recipe left behind would sample otherwise)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from histosynth.methods import methods
from histosynth.recipes import RECIPE_DIR, load_recipe


def _fallback(method) -> int | None:
    module = importlib.import_module(method.pipeline.__module__) if method.pipeline is not None else None
    return getattr(module, "DEFAULT_SAMPLING", {}).get("num_inference_steps")


def _type_default(recipe_type):
    field = next((f for f in dataclasses.fields(recipe_type) if f.name == "sampling"), None)
    if field is None:
        return None
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


SAMPLED = [m for m in methods() if _fallback(m) is not None]


def test_every_sampling_method_is_checked():
    assert {m.name for m in SAMPLED} >= {"nasdm", "pathldm", "histosmith", "disc", "zoomldm"}


@pytest.mark.parametrize("method", SAMPLED, ids=lambda m: m.name)
def test_a_method_has_one_default_step_count(method):
    steps = _fallback(method)
    default = _type_default(method.recipe)
    if default is not None:
        assert default.num_inference_steps == steps
    builtin = [load_recipe(path) for path in sorted(RECIPE_DIR.glob("*.yaml"))]
    mine = [r for r in builtin if r.method == method.name and getattr(r, "sampling", None) is not None]
    assert {r.name: r.sampling.num_inference_steps for r in mine} == {r.name: steps for r in mine}
