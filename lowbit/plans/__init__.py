"""Per-tensor format plans: uniform settings, llama.cpp's mixes and plan files are one concept."""
from lowbit.plans.plan import FLOAT, FormatPlan

__all__ = ["FLOAT", "FormatPlan"]
