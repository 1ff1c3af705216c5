"""Gopher App. C's precision ablation, scaled down: one model, four precision settings.

  python -m experiments.sweep --config=experiments/configs/precision.py

The `c2` size of the CPU sweep (2 layers, d_model 64, 2 heads of 32; 0.37M parameters with
the tied embedding) trained for 256 steps of 16 x 256 tokens (1M tokens) on the embedded
mixture under each of Gopher's four settings (gopher/precision.py):
  fp32         fp32 parameters and activations
  bf16         bf16 parameters and activations, updates rounded to nearest
  bf16_sr      bf16 parameters, updates stochastically rounded
  bf16_master  bf16 parameters for compute, an fp32 master copy in the optimiser state
with seeds 0, 1 and 2; the same seed gives every setting the same initial weights (drawn
in fp32, then cast) and the same data order. Reported (results/sweep_precision): the loss
curves in one plot, final held-out bpb per setting with its spread over seeds, and the
size of the last updates against the spacing of bf16 numbers at each parameter (why
round-to-nearest loses updates). Gopher found bf16_master indistinguishable from fp32
and stochastic rounding not fully recovering it (417M model).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import sweep


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    if variant != "cpu":
        raise ValueError(f"unknown precision-ablation variant {variant!r}; use cpu")
    cfg = sweep.get_config("cpu")
    cfg.variant = "precision"
    cfg.sizes = [s for s in cfg.sizes if s.name == "c2"]
    for size in cfg.sizes:
        size.budgets = ()
    cfg.budgets = [ml_collections.ConfigDict(dict(name="p256", tokens=256 * 16 * 256, flops=0.0))]
    cfg.precisions = ("fp32", "bf16", "bf16_sr", "bf16_master")
    cfg.seeds = (0, 1, 2)
    cfg.evals_per_run = 8
    cfg.eval.tasks = ""  # held-out bpb only: the settings differ by hundredths of a bit
    cfg.overrides = (("train.log_every", 4),)
    return cfg
