"""Gopher's model table as experiment configs, plus CPU-sized `tiny` and `test`.

Run (the demo, `make demo`: 8 simulated devices, a (4, 2) mesh, ZeRO-1, remat; about
8 minutes on a 2-core CPU):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.train \
      --config=experiments/configs/gopher.py:tiny --workdir=runs/demo \
      --config.parallel.data=4 --config.parallel.model=2 --config.parallel.zero=1 \
      --config.train.remat=full

A table row (on a pod; batch from the table, 2048 tokens per sequence):
  python -m experiments.train --config=experiments/configs/gopher.py:44m \\
      --config.train.steps=1000 --workdir=gs://bucket/44m

Any field can be overridden, e.g. --config.model.seq_len=512 --config.train.precision=mixed.
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
    # overridable from the command line.
    cfg.train.max_lr = model.max_lr
    cfg.train.clip_norm = model.clip_norm
    cfg.train.batch_size = max(1, model.batch_tokens // model.seq_len)

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
