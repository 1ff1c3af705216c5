"""Gopher's model table as experiment configs, plus CPU-sized `tiny` and `test`.

Run (the demo, `make demo`: 8 simulated devices, a (4, 2) mesh, ZeRO-1, remat; about
8 minutes on a 2-core CPU):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.train \\
      --config=experiments/configs/gopher.py:tiny --workdir=runs/demo \\
      --config.parallel.data=4 --config.parallel.model=2 --config.parallel.zero=1 \\
      --config.train.remat=full

A table row (on a pod) runs Gopher's recipe: the row's batch in 2048-token sequences
(128; 1024 for 7.1b; 1536 -> 3072 after step 47,684 for 280b), its precision (mixed below
7.1b, bf16_sr from 7.1b) and 300B tokens (44m: 1,144,410 steps). A shorter run
shortens the 1,500-step warm-up too (a run of no more steps than the warm-up never
reaches the max LR, nor decays from it):
  python -m experiments.train --config=experiments/configs/gopher.py:44m \\
      --config.train.steps=1000 --config.train.warmup_steps=50 --workdir=gs://bucket/44m

Any field can be overridden, e.g. --config.model.seq_len=512 --config.train.precision=fp32
--config.train.batch_schedule='((10, 16),)'.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from gopher import config as gopher_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    model = gopher_config.get_preset(preset)
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    cfg.model.preset = preset

    train = gopher_config.TrainConfig()
    cfg.train = ml_collections.ConfigDict(dataclasses.asdict(train))
    # Recipe fields that default to the model row (None) need a concrete type to be
    # overridable from the command line. Training reads these train.X copies: override
    # --config.train.X (a changed --config.model.X is refused, experiments/common.py).
    cfg.train.max_lr = model.max_lr
    cfg.train.clip_norm = model.clip_norm
    cfg.train.batch_size = model.batch_size
    cfg.train.batch_schedule = model.batch_schedule
    cfg.train.precision = model.precision
    if preset in gopher_config.TABLE_PRESETS:  # 300B tokens, as every Gopher model
        recipe = gopher_config.TrainConfig(
            batch_size=model.batch_size, batch_schedule=model.batch_schedule
        )
        cfg.train.steps = gopher_config.steps_for_tokens(recipe, model.seq_len)

    data = dataclasses.asdict(gopher_config.DataConfig())
    data["paths"] = ""  # comma-separated list of files, directories or globs
    cfg.data = ml_collections.ConfigDict(data)

    cfg.parallel = ml_collections.ConfigDict(dataclasses.asdict(gopher_config.ParallelConfig()))

    if preset == "tiny":
        # A few minutes on 2 CPU cores: 300 steps of 16 x 256 tokens.
        cfg.train.steps = 300
        cfg.train.warmup_steps = 30
        cfg.train.eval_every = 100
        cfg.train.checkpoint_every = 100
        cfg.train.log_every = 10
        cfg.data.source = "embedded"  # the MassiveText-like mixture, built on first run
    elif preset == "test":
        cfg.train.steps = 50
        cfg.train.warmup_steps = 5
        cfg.train.eval_every = 25
        cfg.train.eval_batches = 2
        cfg.data.tokenizer_sample_bytes = 300_000
    return cfg
