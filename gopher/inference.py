"""A trained model, loaded from a run's workdir for evaluation and sampling.

`load(workdir)` reads WORKDIR/config.json (the run's model, recipe, data and mesh),
restores the newest good checkpoint (or `step`) onto a mesh of this machine's devices
(Orbax reshards: a model trained on a pod loads on one host, and back), and finds the
run's tokenizer by the sha256 the checkpoint recorded. What it returns holds the
parameters as the training forward pass reads them, split over the mesh by the same
Megatron rules as training, and that forward pass (the run's compute dtype, no remat).
Loading only reads the workdir: checkpoints.json (a restart_from_scratch in progress) and
every checkpoint stay as they are; an unreadable newest step is skipped with a warning
(training quarantines it, not this), and an explicit `step` that fails is an error.

Shape glossary: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gopher import paths
from gopher.config import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    data_from_dict,
    model_from_dict,
    parallel_from_dict,
    train_from_dict,
)
from gopher.data.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    model_cfg: ModelConfig
    params: Any  # sharded over `mesh` like training's parameters
    apply: Any  # (params, tokens [B, T] int32) -> logits [B, T, V] fp32
    tokenizer: Tokenizer
    mesh: Mesh
    step: int = 0
    train_cfg: TrainConfig | None = None
    data_cfg: DataConfig | None = None
    workdir: str = ""
    compute_dtype: Any = None  # what `apply` computes in (None: from train_cfg, else params)

    @property
    def batch_sharding(self) -> NamedSharding:
        """Rows [B, ...] split over the mesh's batch axes (replicated over "model")."""
        from gopher.sharding import BATCH_AXES

        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def batch_multiple(self) -> int:
        """Row counts must be a multiple of this (the devices the batch is split over)."""
        from gopher.partition import axis_sizes

        sizes = axis_sizes(self.mesh)
        return sizes["replica"] * sizes["data"]


_SECTIONS = (
    ("model", model_from_dict),
    ("train", train_from_dict),
    ("data", data_from_dict),
    ("parallel", parallel_from_dict),
)


def read_config(workdir: str) -> tuple[ModelConfig, TrainConfig, DataConfig, ParallelConfig]:
    path = paths.resolve(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{workdir!r} has no config.json; pass the --workdir of a training run "
            "(python -m experiments.train writes one)"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); restore it from the run") from None
    # A file that parses but is not a run's record (a section missing, a field unknown
    # or of another type) is one line naming it, not a KeyError or TypeError traceback.
    fix = "restore it from the run that wrote it"
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object (a {type(cfg).__name__}); {fix}")
    read = []
    for name, reader in _SECTIONS:
        section = cfg.get(name, {} if name == "parallel" else None)  # older runs: no parallel
        if section is None:
            raise ValueError(f"{path} has no {name!r} section; {fix}")
        try:
            if not isinstance(section, dict):
                raise TypeError(f"a {type(section).__name__}, not an object")
            read.append(reader(section))
        except (TypeError, ValueError, KeyError) as e:
            why = " ".join(str(e).split())
            raise ValueError(f"{path} has a bad {name!r} section ({why}); {fix}") from None
    return tuple(read)


def _tokenizer_candidates(
    workdir: str, model_cfg: ModelConfig, data_cfg: DataConfig
) -> tuple[list[str], list[str]]:
    """The paths that may hold the run's tokenizer, and what could not be read on the way
    (a missing or damaged corpus manifest: reported if no candidate matches)."""
    found, unreadable = [paths.join(workdir, "tokenizer.model")], []
    if data_cfg.tokenizer_path:
        found.append(data_cfg.tokenizer_path)
    if data_cfg.source == "embedded":
        from gopher.data.pipeline import default_corpus_dir

        corpus = data_cfg.corpus_dir or default_corpus_dir(model_cfg.vocab_size)
        manifest = paths.resolve(corpus) / "manifest.json"
        if manifest.is_file():
            try:
                found.append(
                    paths.join(corpus, json.loads(manifest.read_text())["tokenizer"]["file"])
                )
            except (OSError, ValueError, KeyError, TypeError) as e:
                why = " ".join(f"{type(e).__name__} {e}".split())
                unreadable.append(f"{manifest} (unreadable: {why})")
        else:
            unreadable.append(f"{manifest} (missing)")
    return found, unreadable


def find_tokenizer(workdir: str, model_cfg, data_cfg, sha256: str | None) -> Tokenizer:
    """The run's tokenizer: the first candidate whose sha256 is the checkpoint's (a
    damaged candidate is passed over, and named if none matches)."""
    candidates, tried = _tokenizer_candidates(workdir, model_cfg, data_cfg)
    for path in candidates:
        if not paths.resolve(path).is_file():
            tried.append(f"{path} (missing)")
            continue
        try:
            tok = Tokenizer.load(path)
        except (OSError, ValueError) as e:
            tried.append(
                f"{path} ({'not a SentencePiece model' if isinstance(e, ValueError) else e})"
            )
            continue
        if sha256 is None or tok.sha256 == sha256:
            return tok
        tried.append(f"{path} (sha256 {tok.sha256[:12]})")
    raise ValueError(
        f"no tokenizer of {workdir!r} matches its checkpoint's sha256 {str(sha256)[:12]}"
        + (f"; tried {', '.join(tried)}" if tried else "")
        + "; pass the run's workdir, or rebuild its corpus with experiments.prepare_data"
    )


@dataclasses.dataclass
class RestoredRun:
    """A run's whole train state (params, optimiser state, master copy) at one step."""

    state: Any
    meta: dict
    step: int
    model_cfg: ModelConfig
    train_cfg: TrainConfig  # the run's own recipe (steps, LR schedule, precision)
    data_cfg: DataConfig
    parallel: ParallelConfig  # the mesh it was restored onto


def restore_state(
    workdir: str,
    step: int | None = None,
    parallel: ParallelConfig | None = None,
    params_only: bool = False,
) -> RestoredRun:
    """The run in `workdir` at its newest restorable checkpoint (or `step`), whole, or
    its parameters alone (`params_only`: the rest of the state is None)."""
    from gopher import checkpoint as checkpoint_lib
    from gopher import engine as engine_lib

    model_cfg, run_train_cfg, data_cfg, _ = read_config(workdir)
    parallel = parallel or ParallelConfig(data=jax.device_count())
    # The restore needs the state's structure, not the run's batch: any divisible one.
    sizes = parallel.data * max(parallel.replica, 1)
    train_cfg = dataclasses.replace(
        run_train_cfg, batch_size=sizes, batch_schedule=(), microbatches=1
    )
    engine = engine_lib.build(model_cfg, train_cfg, parallel)
    # Read-only: a run may be training (or waiting to be rerun) in this workdir; loading
    # it changes nothing there (no record, no quarantine, no tmp cleanup).
    directory = checkpoint_lib.active_checkpoint_directory(workdir)
    if not paths.resolve(directory).is_dir():
        raise ValueError(
            f"{workdir!r} has no checkpoint in {directory}; train first "
            "(python -m experiments.train --workdir=...)"
        )
    ckpt = checkpoint_lib.Checkpointer(directory, read_only=True, params_only=params_only)
    model = dataclasses.asdict(model_cfg)
    try:
        abstract = engine.abstract_state()
        if step is None:
            try:
                restored = ckpt.restore_latest(abstract, model=model)
            except checkpoint_lib.RestoreFailed as e:
                if e.other_shape:  # config.json was rewritten for another model
                    raise checkpoint_lib.CheckpointError(
                        f"{workdir}/config.json does not describe the model its checkpoints "
                        f"hold: {e.tried}; restore config.json from the run that wrote them"
                    ) from e
                if e.tried:  # training's fix (restart_from_scratch) is no flag of a loader's
                    raise checkpoint_lib.CheckpointError(
                        f"no checkpoint in {directory} restores: {e.tried}; nothing was moved "
                        "or deleted; fix the storage or put back a good copy of a step, "
                        "then rerun"
                    ) from e
                raise checkpoint_lib.CheckpointError(str(e)) from e
            if restored is None:
                raise ValueError(
                    f"{workdir!r} has no checkpoint in {directory}; train first "
                    "(python -m experiments.train --workdir=...)"
                )
            step, state, meta = restored
        else:
            state, meta = ckpt.restore_step(step, abstract, model=model)
    finally:
        ckpt.close()
    if not params_only:
        state = engine.from_checkpoint(state)
    return RestoredRun(state, meta, int(step), model_cfg, run_train_cfg, data_cfg, parallel)


def load(
    workdir: str,
    step: int | None = None,
    parallel: ParallelConfig | None = None,
) -> LoadedModel:
    """The run in `workdir` at its newest restorable checkpoint (or `step`).

    `parallel`: the mesh to load onto; default all local devices over "data" (the run's
    own mesh may need more devices than this machine has).
    """
    run = restore_state(workdir, step, parallel, params_only=True)
    model_cfg, train_cfg, data_cfg, parallel = (
        run.model_cfg,
        run.train_cfg,
        run.data_cfg,
        run.parallel,
    )
    state, meta, step = run.state, run.meta, run.step
    sizes = parallel.data * max(parallel.replica, 1)
    train_cfg = dataclasses.replace(train_cfg, batch_size=sizes, batch_schedule=(), microbatches=1)
    tokenizer = find_tokenizer(workdir, model_cfg, data_cfg, meta.get("tokenizer_sha256"))
    from gopher import sharding
    from gopher.model import build_forward
    from gopher.precision import get_policy

    mesh = sharding.make_mesh(parallel)
    compute_dtype = get_policy(train_cfg.precision).compute_dtype
    forward = build_forward(
        model_cfg, compute_dtype, attention=sharding.attention_layout(model_cfg, mesh)
    )
    return LoadedModel(
        model_cfg=model_cfg,
        params=state.params,
        apply=forward.apply,
        tokenizer=tokenizer,
        mesh=mesh,
        step=int(step),
        train_cfg=train_cfg,
        data_cfg=data_cfg,
        workdir=workdir,
        compute_dtype=jnp.dtype(compute_dtype),
    )


def from_params(
    model_cfg: ModelConfig,
    params: Any,
    tokenizer: Tokenizer,
    mesh: Mesh | None = None,
    compute_dtype=jnp.float32,
) -> LoadedModel:
    """A LoadedModel from parameters in memory (tests, notebooks): placed on `mesh`
    (default: all devices over "data") by the training partition rules."""
    from gopher import sharding
    from gopher.model import build_forward

    mesh = mesh or sharding.make_mesh(ParallelConfig(data=jax.device_count()))
    params = jax.device_put(params, param_shardings(params, mesh))
    forward = build_forward(
        model_cfg, compute_dtype, attention=sharding.attention_layout(model_cfg, mesh)
    )
    return LoadedModel(
        model_cfg, params, forward.apply, tokenizer, mesh, compute_dtype=jnp.dtype(compute_dtype)
    )


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedShardings of `params` by the training Megatron rules (no ZeRO split)."""
    from gopher import partition, sharding
    from gopher.train import TrainState

    state = TrainState(params, None, None, None, None, None)
    specs = partition.state_partition_specs(state, mesh, zero=0).specs.params
    return sharding.named_shardings(mesh, specs)


def pad_rows(rows: np.ndarray, multiple: int, fill: int = 0) -> np.ndarray:
    """rows [N, ...] padded with `fill` to a multiple of `multiple` rows."""
    extra = -len(rows) % multiple
    if not extra:
        return rows
    pad = np.full((extra, *rows.shape[1:]), fill, dtype=rows.dtype)
    return np.concatenate([rows, pad])
