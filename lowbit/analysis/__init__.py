"""Outlier diagnosis: where a model's outliers live, whether they matter, and a report that shows them."""
from .config import (AnalyzeConfig, FeatureConfig, LevelsConfig, MassiveConfig, SensitivityConfig,
                     SuperWeightConfig, WeightConfig)

__all__ = ["AnalyzeConfig", "FeatureConfig", "LevelsConfig", "MassiveConfig", "SensitivityConfig",
           "SuperWeightConfig", "WeightConfig"]
