"""The model-size sweep: Gopher's table scaled to a budget, as one config per variant.

  python -m experiments.sweep --config=experiments/configs/sweep.py:cpu --workdir=runs/sweep_cpu
  python -m experiments.sweep --config=experiments/configs/sweep.py:tpu --plan_only

Variants:
  cpu    six sizes (69k ... 2.7M parameters with the tied embedding, 3.3k ... 1.9M
         without) with the 44m row's shape ratios (heads of 32 = d_model / 32 heads, FFW
         4x, d_model / layers 16 to 48; c0 has one head of 16), on the embedded
         MassiveText-like mixture with a 4,096-piece vocabulary: one token-matched group
         (c0 ... c5, 2M tokens each: held-out loss should fall with size) and three
         compute-matched groups (3e12 over c0-c3, 1e13 over c0-c4, 2e13 over c1-c5: IsoFLOP
         curves, U-shaped in size once a budget's optimum is inside its sizes;
         CPU_SIZE_BUDGETS leaves out the sizes far from a budget's optimum, and the runs
         that would read a source more than max_epochs times). About an hour of training
         on 2 CPU cores, plus evaluation.
  smoke  two `test`-sized models x 20 steps on the stdlib corpus (what `make test` kills and
         resumes).
  tpu    the real sweep: the table's 44m, 117m, 417m, 1.4b and 7.1b rows at their learning
         rates, batches, clip norms, precision and 300B tokens (each run starts from its
         row's own config, gopher.py:PRESET), with the mesh each needs on a v3-2048
         pod (the planner's choice in benchmarks/plan_v3_32x32.json); `--plan_only` compiles
         each run's step for the topology and reports whether it fits.

The recipe of each run suits its length (Chinchilla App. B: a cosine much longer than the
run hurts): warm-up is `warmup_fraction` of the run's steps, rounded down (at most 5%;
none for a run under 20 steps; warmup_fraction 0, Gopher's 1,500 steps, is refused for a
run under 30,000 steps), the cosine decays 10x over exactly the run's steps, and the
learning rate follows `lr_rule`: max_lr = lr_base * (lr_ref_d_model / d_model) ** lr_exponent (the table's rows
fall from 6e-4 at d 512 to 2e-4 at d 2048 and 1.2e-4 at d 4096: about d^-0.8; the CPU
sizes use a gentler d^-0.5 from 1e-3 at d 256, the `tiny` preset's). A run whose data
would repeat any source more than `max_epochs` times is refused before it starts
(Muennighoff et al. 2023: up to ~4 epochs cost little).

Training FLOPs are counted per token as 6N + 12 L H Q T (N: every parameter, the tied
embedding once, i.e. the output layer's matmul; 12 L H Q T: attention's scores and
weighted sum, as in PaLM's MFU; Gopher's relative position term adds a third T^2 matmul,
6 L H Q T more, which budgets and MFU leave out). A compute-matched run gets
ceil(C / (flops_per_token * batch_tokens)) steps.
"""

from __future__ import annotations

import ml_collections

# name, layers, heads, key_size, d_model: the table's rows and the CPU sizes.
CPU_SIZES = (
    ("c0", 1, 1, 16, 16),
    ("c1", 1, 1, 32, 32),
    ("c2", 2, 2, 32, 64),
    ("c3", 3, 3, 32, 96),
    ("c4", 4, 4, 32, 128),
    ("c5", 4, 6, 32, 192),
)
SMOKE_SIZES = (("t1", 1, 2, 16, 32), ("t2", 2, 4, 16, 64))
TABLE_SIZES = ("44m", "117m", "417m", "1.4b", "7.1b")
# The planner's first fit per row on a v3-2048 pod (32x32 = 1,024 chips, 2,048 core
# devices; benchmarks/plan_v3_32x32.md): data x model, ZeRO stage, remat. Batches are the
# table's, one sequence per data index below 7.1b.
TPU_PARALLEL = {
    "44m": dict(data=128, model=16, zero=1, remat="full"),
    "117m": dict(data=128, model=16, zero=1, remat="full"),
    "417m": dict(data=128, model=16, zero=1, remat="full"),
    "1.4b": dict(data=128, model=16, zero=1, remat="full"),
    "7.1b": dict(data=1024, model=2, zero=1, remat="full"),
}


# Budgets a size is trained for when not all: a size far from a budget's optimum costs time
# and shows nothing (c5 under 1e13 trains 132 steps), and c1 under 3e13 would read the
# technical source 5.7 times; the budgets step 2-3x in compute, so each optimum (which
# moves as about C^0.5) lands a size further along the grid.
CPU_SIZE_BUDGETS = {
    "c0": ("tok2m", "c3e12", "c1e13"),
    "c1": ("tok2m", "c3e12", "c1e13", "c2e13"),
    "c4": ("tok2m", "c1e13", "c2e13"),
    "c5": ("tok2m", "c2e13"),
}


def _sizes(rows, budgets=None) -> list:
    return [
        ml_collections.ConfigDict(
            dict(
                name=n,
                num_layers=layers,
                num_heads=h,
                key_size=q,
                d_model=d,
                preset="",
                overrides=(),
                budgets=(budgets or {}).get(n, ()),
            )
        )
        for n, layers, h, q, d in rows
    ]


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.variant = variant
    # The train config each run starts from; a size with a `preset` starts from FILE:PRESET.
    cfg.base = "experiments/configs/gopher.py:tiny"
    cfg.seeds = (0,)
    cfg.precision = "fp32"
    cfg.warmup_fraction = 0.05
    cfg.final_lr_ratio = 0.1
    cfg.max_epochs = 4.0
    cfg.lr_base, cfg.lr_ref_d_model, cfg.lr_exponent = 1e-3, 256, 0.5
    cfg.min_steps = 10  # a compute-matched run shorter than this is skipped (said in the table)
    cfg.evals_per_run = 5  # in-training held-out evals (the loss curves)
    cfg.overrides = ()  # (KEY, VALUE) pairs: more --config.KEY=VALUE for every run
    # Post-training evaluation (in the sweep process, per run).
    cfg.eval = ml_collections.ConfigDict(
        dict(tasks="lambada,piqa,arc_easy", limit=200, heldout_docs=32, doc_bytes=8192)
    )
    if variant == "cpu":
        cfg.sizes = _sizes(CPU_SIZES, CPU_SIZE_BUDGETS)
        cfg.seq_len, cfg.batch_size, cfg.vocab_size = 256, 16, 4096
        cfg.budgets = [
            ml_collections.ConfigDict(dict(name="tok2m", tokens=2_097_152, flops=0.0)),
            ml_collections.ConfigDict(dict(name="c3e12", tokens=0, flops=3e12)),
            ml_collections.ConfigDict(dict(name="c1e13", tokens=0, flops=1e13)),
            ml_collections.ConfigDict(dict(name="c2e13", tokens=0, flops=2e13)),
        ]
    elif variant == "smoke":
        cfg.base = "experiments/configs/gopher.py:test"
        cfg.sizes = _sizes(SMOKE_SIZES)
        cfg.seq_len, cfg.batch_size, cfg.vocab_size = 64, 8, 512
        cfg.lr_base, cfg.lr_ref_d_model = 3e-3, 64
        cfg.budgets = [ml_collections.ConfigDict(dict(name="s20", tokens=20 * 8 * 64, flops=0.0))]
        cfg.min_steps = 1
        cfg.evals_per_run = 2
        cfg.max_epochs = 1000.0  # the stdlib corpus is small; the smoke tests resuming
        cfg.eval = ml_collections.ConfigDict(
            dict(tasks="", limit=0, heldout_docs=4, doc_bytes=2048)
        )
        cfg.overrides = (("train.checkpoint_every", 5), ("data.tokenizer_sample_bytes", 300_000))
    elif variant == "tpu":
        cfg.base = "experiments/configs/gopher.py:44m"  # each size: gopher.py:ITS_PRESET
        cfg.sizes = [
            ml_collections.ConfigDict(
                dict(name=p, preset=p, **_zeros(), overrides=_mesh(TPU_PARALLEL[p]), budgets=())
            )
            for p in TABLE_SIZES
        ]
        cfg.seq_len, cfg.batch_size, cfg.vocab_size = 2048, 0, 32_000  # 0: the row's batch
        cfg.precision = ""  # the row's (mixed below 7.1b, bf16_sr at 7.1b)
        cfg.lr_base = 0.0  # 0: the row's max LR (Table 1)
        cfg.warmup_fraction = 0.0  # 0: Gopher's 1,500 steps
        cfg.budgets = [ml_collections.ConfigDict(dict(name="300b", tokens=300 * 10**9, flops=0.0))]
        cfg.topology = "v3:32x32"
        cfg.eval = ml_collections.ConfigDict(
            dict(tasks="all", limit=0, heldout_docs=0, doc_bytes=0)
        )
    else:
        raise ValueError(f"unknown sweep variant {variant!r}; use cpu, smoke or tpu")
    return cfg


def _mesh(parallel: dict) -> tuple:
    """A size's --config overrides for its mesh, ZeRO stage and remat policy."""
    return tuple((("train." if k == "remat" else "parallel.") + k, v) for k, v in parallel.items())


def _zeros() -> dict:
    return dict(num_layers=0, num_heads=0, key_size=0, d_model=0)
