"""Quantization methods: each turns a float weight into a QTensor of a given Format."""
from lowbit.methods.rtn import RtnConfig, mse_clip, rtn

__all__ = ["RtnConfig", "mse_clip", "rtn"]
