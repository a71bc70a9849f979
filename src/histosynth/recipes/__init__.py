"""Typed training recipes: one named field per hyperparameter, loaded from YAML, no `target:` strings.

Each method's recipe lives in its own module (``nasdm``, ``pathldm``, ``autoencoder``, ``histosmith``, ``zoomldm``, ``disc``, ``segmenter``); the
loader and the engine's shared fields are in ``base``. See :mod:`histosynth.recipes.base`.
"""

from histosynth.recipes.base import (
    METHOD_ALIASES,
    RECIPE_DIR,
    RECIPE_TYPES,
    EngineConfig,
    Recipe,
    builtin_recipes,
    load_recipe,
    recipe_from_dict,
    register_recipe_type,
)
from histosynth.recipes.autoencoder import AutoencoderRecipe
from histosynth.recipes.nasdm import NASDMRecipe
from histosynth.recipes.pathldm import LatentDiffusionRecipe
from histosynth.recipes.histosmith import HistoSmithRecipe, JointAutoencoderRecipe
from histosynth.recipes.zoomldm import ZoomConditionsRecipe, ZoomLDMRecipe
from histosynth.recipes.disc import DISCRecipe
from histosynth.recipes.segmenter import SegmenterRecipe

__all__ = ["METHOD_ALIASES", "RECIPE_DIR", "RECIPE_TYPES", "AutoencoderRecipe", "DISCRecipe", "EngineConfig", "HistoSmithRecipe", "JointAutoencoderRecipe", "LatentDiffusionRecipe",
           "NASDMRecipe", "Recipe", "SegmenterRecipe", "ZoomConditionsRecipe", "ZoomLDMRecipe", "builtin_recipes", "load_recipe", "recipe_from_dict",
           "register_recipe_type"]
