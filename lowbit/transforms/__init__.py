"""Function-preserving rewrites of a model: per-channel smoothing scales folded into the
producer of a linear group's input (a norm, or the rows of a preceding linear)."""
from lowbit.transforms.plan import ScalePlan, apply_plan
from lowbit.transforms.scaling import fold_scales, source_scales, tie_to_source

__all__ = ["ScalePlan", "apply_plan", "fold_scales", "source_scales", "tie_to_source"]
