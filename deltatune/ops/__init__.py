"""Numerical kernels shared by the training loop and the benchmarks."""

from deltatune.ops.fused_ce import causal_lm_loss, fused_linear_cross_entropy

__all__ = ["causal_lm_loss", "fused_linear_cross_entropy"]
