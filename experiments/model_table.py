"""Print the model table with parameter counts from `jax.eval_shape` (no weights allocated),
each row's batch in sequences (and its schedule: 280b 1536 -> 3072 midway) and default
precision, as Gopher trained them.

python -m experiments.model_table --format=json
python -m experiments.model_table --format=markdown
"""

from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from gopher import config as gopher_config
from gopher.model import build_forward

_FORMAT = flags.DEFINE_enum("format", "markdown", ["json", "markdown"], "Output format.")
_ALL = flags.DEFINE_bool("all", False, "Include the CPU presets (tiny, test).")


def rows(names):
    out = []
    for name in names:
        cfg = gopher_config.get_preset(name)
        shapes = jax.eval_shape(
            build_forward(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
        )
        params = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
        out.append(
            {
                "name": name,
                "layers": cfg.num_layers,
                "heads": cfg.num_heads,
                "key_size": cfg.key_size,
                "d_model": cfg.d_model,
                "seq_len": cfg.seq_len,
                "max_lr": cfg.max_lr,
                "batch_size": cfg.batch_size,
                "batch_schedule": [list(p) for p in cfg.batch_schedule],
                "batch_tokens": cfg.batch_tokens,
                "clip_norm": cfg.clip_norm,
                "precision": cfg.precision,
                "params": params,
                "params_formula": cfg.param_count_formula(),
            }
        )
    return out


def main(argv):
    del argv
    names = list(gopher_config.PRESETS) if _ALL.value else list(gopher_config.TABLE_PRESETS)
    table = rows(names)
    if _FORMAT.value == "json":
        print(json.dumps(table, indent=1))
        return 0
    print(
        "| model | layers | heads | key | d_model | max LR | batch (sequences) | batch tokens "
        "| clip | precision | params |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['name']} | {r['layers']} | {r['heads']} | {r['key_size']} | {r['d_model']} "
            f"| {r['max_lr']:g} | {batch_text(r)} | {batch_text(r, r['seq_len'])} | {r['clip_norm']} "
            f"| {r['precision']} | {r['params']:,} |"
        )
    return 0


def batch_text(row: dict, per_sequence: int = 1) -> str:
    """The batch in sequences ('128', or '1536 -> 3072 after step 47,684' for a schedule),
    or in tokens with `per_sequence` = seq_len."""
    text = f"{row['batch_size'] * per_sequence:,}"
    for after, size in row["batch_schedule"]:
        text += f" -> {size * per_sequence:,} after step {after:,}"
    return text


if __name__ == "__main__":
    sys.exit(app.run(main))
