"""Frozen configuration dataclasses and the Gopher model table (Table 1).

Library code takes these dataclasses; experiment files are ml_collections
ConfigDicts turned into dataclasses once, at the entry point (`from_config_dict`).
Every config validates itself on construction and names the bad field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and the fix."""


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checked(obj: Any, names: tuple[str, ...], integer: bool, low: str, ok) -> None:
    """Each field is a finite number (an int if `integer`; never a bool) for which
    `ok(value)` holds; otherwise a ConfigError naming the field, the bound and the flag.
    A count such as 1.5 steps would fail only later, deep in a loop or a reshape."""
    for name in names:
        value = getattr(obj, name)
        if not _is_number(value) or (integer and not isinstance(value, int)) or not ok(value):
            raise ConfigError(
                f"{type(obj).__name__}.{name} = {value!r} must be "
                f"{'an integer' if integer else 'a finite number'} {low}; set "
                f"--config.{_prefix(obj)}{name} to a value {low}"
            )


def _positive(obj: Any, *names: str, integer: bool = False) -> None:
    """Each field is a finite number > 0 (a whole number if `integer`)."""
    _checked(obj, names, integer, "> 0", lambda v: v > 0)


def _at_least_zero(obj: Any, *names: str, integer: bool = False) -> None:
    """Each field is a finite number >= 0 (a whole number if `integer`)."""
    _checked(obj, names, integer, ">= 0", lambda v: v >= 0)


PRECISIONS = ("fp32", "mixed", "bf16", "bf16_sr", "bf16_master")  # Gopher App. C
ATTENTIONS = ("auto", "xla", "pallas", "pallas_fused", "cudnn", "cpu")  # ModelConfig.attention
TRAIN_TOKENS = 300_000_000_000  # every Gopher model trained on 300B tokens


def _prefix(obj: Any) -> str:
    return {"ModelConfig": "model.", "TrainConfig": "train.", "DataConfig": "data."}.get(
        type(obj).__name__, ""
    )


def _check_precision(obj: Any) -> None:
    if obj.precision not in PRECISIONS:
        raise ConfigError(
            f"{type(obj).__name__}.precision = {obj.precision!r} is unknown; use one of "
            f"{', '.join(PRECISIONS)} (--config.{_prefix(obj)}precision)"
        )


def _as_pairs(value: Any) -> Any:
    """((step, batch), ...) as tuples (JSON and YAML give lists); anything else as is."""
    if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in value):
        return tuple(tuple(p) for p in value)
    return value


def _check_batch_schedule(obj: Any) -> None:
    """(after_step, batch_size) pairs of positive ints, steps increasing, each batch a
    multiple of the first (the data stream is read in blocks of `batch_size` sequences)."""
    object.__setattr__(obj, "batch_schedule", _as_pairs(obj.batch_schedule))
    schedule, name = obj.batch_schedule, f"{type(obj).__name__}.batch_schedule"
    flag = f"--config.{_prefix(obj)}batch_schedule"

    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not isinstance(schedule, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 and whole(p[0]) and whole(p[1]) for p in schedule
    ):
        raise ConfigError(
            f"{name} = {schedule!r} must be (after_step, batch_size) pairs of positive "
            f"integers; e.g. {flag}='((10, 16),)' (16 sequences per step after step 10)"
        )
    steps = [step for step, _ in schedule]
    if steps != sorted(set(steps)):
        raise ConfigError(
            f"{name} = {schedule!r} has after_steps {steps} out of order; list each switch "
            f"once, in increasing step order ({flag})"
        )
    for step, batch in schedule:
        if batch % obj.batch_size:
            raise ConfigError(
                f"{name}: batch {batch} after step {step} is not a multiple of batch_size "
                f"{obj.batch_size}; use multiples of it in {flag} (Gopher: 1536 -> 3072)"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One row of the model table plus the few knobs the architecture has.

    `max_lr`, `clip_norm`, `batch_size` (sequences of `seq_len` tokens), `batch_schedule`
    and `precision` are the table's recipe for this size. `TrainConfig` reads `max_lr` and
    `clip_norm` from here when its own are None, but has its own `batch_size` (16),
    `batch_schedule` (none) and `precision` (fp32): the experiment config copies all five
    into the train section; code that builds a `TrainConfig` itself passes them.
    """

    num_layers: int
    num_heads: int
    key_size: int
    d_model: int
    max_lr: float = 6e-4
    batch_size: int = 128  # sequences per step; batch_tokens = batch_size * seq_len
    batch_schedule: tuple[tuple[int, int], ...] = ()  # see TrainConfig.batch_schedule
    precision: str = "fp32"  # the size's default (TrainConfig.precision)
    clip_norm: float = 1.0
    ffw_multiplier: int = 4
    vocab_size: int = 32_000
    seq_len: int = 2048
    name: str = "custom"
    rms_norm_eps: float = 1e-6
    # Stddev parameter of the truncated normal init (Haiku cuts at 2 sigma without
    # rescaling, so the weights' std is 0.88x this: 0.0176 for 0.02).
    init_scale: float = 0.02
    # Gopher's pre-norm blocks; the output projections of each residual branch are
    # scaled down by 1/sqrt(2 * num_layers) at init (GPT-2), so depth does not blow up.
    scale_residual_init: bool = True
    # How attention is computed (the same maths): "pallas", the fused kernels of
    # gopher/pallas_attention.py (interpret mode on CPU: slow, for tests); "xla", the
    # chunked XLA path; "pallas_fused", the kernel with its one-kernel backward (atomic
    # adds: GPU only); "cudnn", cuDNN's flash attention with the position scores as a bias
    # (NVIDIA GPU, bf16/fp16; gopher/attention_cudnn.py); "cpu", a fused C++ kernel (XLA
    # FFI, fp32; gopher/cpu_kernels.py); "auto", the kernel on TPU, cudnn on GPU and cpu on
    # CPU, each with XLA where it cannot run (gopher/attention.py).
    attention: str = "auto"

    def __post_init__(self):
        _positive(
            self,
            "num_layers",
            "num_heads",
            "key_size",
            "d_model",
            "batch_size",
            "vocab_size",
            "seq_len",
            integer=True,
        )
        _positive(self, "max_lr", "clip_norm", "ffw_multiplier", "rms_norm_eps", "init_scale")
        if self.num_heads * self.key_size != self.d_model:
            raise ConfigError(
                f"ModelConfig: num_heads * key_size = {self.num_heads} * {self.key_size} = "
                f"{self.num_heads * self.key_size} but d_model = {self.d_model}; Gopher "
                f"requires num_heads * key_size == d_model (set --config.model.key_size="
                f"{self.d_model // self.num_heads if self.d_model % self.num_heads == 0 else '?'})"
            )
        if self.d_model % 2:
            raise ConfigError(
                f"ModelConfig.d_model = {self.d_model} must be even (the sinusoidal "
                f"relative encodings, d_model wide, pair sin/cos); use an even d_model"
            )
        if self.attention not in ATTENTIONS:
            raise ConfigError(
                f"ModelConfig.attention = {self.attention!r} is unknown; use one of "
                f"{', '.join(ATTENTIONS)} (--config.model.attention)"
            )
        _check_precision(self)
        _check_batch_schedule(self)

    @property
    def batch_tokens(self) -> int:
        """Tokens per step at the start: Table 1's "Batch (tokens)" (0.25M = 128 x 2048)."""
        return self.batch_size * self.seq_len

    @property
    def ffw_size(self) -> int:
        return self.ffw_multiplier * self.d_model

    def param_count_formula(self) -> int:
        """Gopher's closed form: 13 d^2 L (q,k,v,o,W_R and 8 d^2 MLP) + V d (tied)."""
        return 13 * self.d_model**2 * self.num_layers + self.vocab_size * self.d_model

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _half_of_training(batch_size: int, seq_len: int = 2048) -> int:
    """The first step after which half of the 300B training tokens have been seen at
    `batch_size` sequences per step: 280b's 1536 x 2048 = 3,145,728 tokens per step reach
    150B after ceil(150e9 / 3,145,728) = 47,684 steps (150,000,893,952 tokens)."""
    return -(-TRAIN_TOKENS // 2 // (batch_size * seq_len))


# Gopher Table 1, exactly. Batch sizes are 2048-token sequences (Rae et al. 2021, "Training":
# 0.25M is 2^18 = 128 x 2048 tokens, 2M is 1024 x 2048, 3M -> 6M is 1536 -> 3072); the
# 280b batch doubles midway. Precision: fp32 parameters with bf16 activations below
# 7.1B, bf16 parameters with stochastic rounding for 7.1B and Gopher (App. C).
PRESETS: dict[str, ModelConfig] = {
    "44m": ModelConfig(8, 16, 32, 512, max_lr=6e-4, batch_size=128, precision="mixed"),
    "117m": ModelConfig(12, 12, 64, 768, max_lr=6e-4, batch_size=128, precision="mixed"),
    "417m": ModelConfig(12, 12, 128, 1536, max_lr=2e-4, batch_size=128, precision="mixed"),
    "1.4b": ModelConfig(24, 16, 128, 2048, max_lr=2e-4, batch_size=128, precision="mixed"),
    "7.1b": ModelConfig(
        32, 32, 128, 4096, max_lr=1.2e-4, batch_size=1024, precision="bf16_sr", clip_norm=0.25
    ),
    "280b": ModelConfig(
        80,
        128,
        128,
        16384,
        max_lr=4e-5,
        batch_size=1536,
        batch_schedule=((_half_of_training(1536), 3072),),
        precision="bf16_sr",
        clip_norm=0.25,
    ),
    # CPU presets: the 44m row's shape ratios (key_size 32, d_model = heads * 32,
    # ffw 4x), scaled down so they train in minutes on a laptop; fp32 throughout.
    "tiny": ModelConfig(4, 8, 32, 256, max_lr=1e-3, batch_size=16, vocab_size=4096, seq_len=256),
    "test": ModelConfig(2, 4, 16, 64, max_lr=3e-3, batch_size=8, vocab_size=512, seq_len=64),
}
PRESETS = {name: cfg.replace(name=name) for name, cfg in PRESETS.items()}
TABLE_PRESETS = ("44m", "117m", "417m", "1.4b", "7.1b", "280b")


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training recipe: optimiser, schedule, batch and cadence."""

    steps: int = 1000
    batch_size: int = 16  # sequences per step (global, over every host), until a switch
    # (after_step, batch_size) pairs: once `after_step` steps have run, the steps after it
    # take `batch_size` sequences (Gopher 280b: 1536 -> 3072 midway). Each batch is a
    # multiple of `batch_size`; the LR schedule, metrics and data count the tokens.
    batch_schedule: tuple[tuple[int, int], ...] = ()
    warmup_steps: int = 1500
    warmup_init_lr: float = 1e-7
    final_lr_ratio: float = 0.1  # cosine decays 10x (Gopher)
    max_lr: float | None = None  # None: the model row's max LR
    clip_norm: float | None = None  # None: the model row's clip norm
    optimizer: str = "adam"  # "adam" (Gopher) or "adamw" (Chinchilla)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8  # at most this many eval batches per held-out source
    # Sequences per eval batch (global; a multiple of the mesh's replica * data), apart from
    # the training batch so that every source is scored at every model size.
    eval_batch_size: int = 8
    precision: str = "fp32"  # fp32 | mixed | bf16 | bf16_sr | bf16_master (Gopher App. C)
    # none | full | dots_saveable | dots_with_no_batch_dims_saveable | everything_saveable
    remat: str = "none"
    # The layer loop: "auto" unrolls it up to 16 layers on CPU and 24 on GPU (faster there;
    # gopher.train.UNROLL_MAX_LAYERS) and scans beyond and on TPU; "yes" / "no" force it.
    # The numbers are the same either way.
    unroll_layers: str = "auto"
    # Gradient accumulation: the batch is split into this many microbatches, run one
    # after another inside the jitted step (lax.scan); the gradient is reduced once.
    microbatches: int = 1
    stop_at_step: int = (
        0  # end this run early at this step (0: at `steps`); the schedule keeps `steps`
    )
    checkpoint_every: int = 200  # steps between (async) checkpoints; also one at the end
    max_to_keep: int = 3
    async_checkpoint: bool = True
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    inject_nan_steps: tuple[int, ...] = ()  # test hook: poison the gradient at these steps
    profile_steps: tuple[int, ...] = ()  # (first, last): a jax.profiler trace of that range
    # Per-device peak FLOP/s for MFU (on a CPU, the host's: its simulated devices share it);
    # 0: looked up (or measured on CPU).
    peak_flops: float = 0.0
    tensorboard: bool = True
    # Start over in a new checkpoint subdirectory (recorded in WORKDIR/checkpoints.json),
    # leaving every old checkpoint untouched: the only way to discard a run's progress.
    restart_from_scratch: bool = False
    # Seconds a step may take before the watchdog dumps every thread's stack (0: off).
    watchdog_s: float = 900.0

    def __post_init__(self):
        counts = (
            "steps",
            "batch_size",
            "log_every",
            "eval_every",
            "eval_batches",
            "eval_batch_size",
            "checkpoint_every",
            "max_to_keep",
            "max_bad_steps",
            "microbatches",
        )
        _positive(self, *counts, integer=True)
        _positive(self, "eps")
        _at_least_zero(self, "stop_at_step", "warmup_steps", integer=True)
        _at_least_zero(self, "warmup_init_lr", "weight_decay", "peak_flops", "watchdog_s")
        if self.profile_steps and (
            len(self.profile_steps) != 2 or not 0 < self.profile_steps[0] <= self.profile_steps[1]
        ):
            raise ConfigError(
                f"TrainConfig.profile_steps = {self.profile_steps!r} must be (first, last) with "
                f"0 < first <= last, e.g. --config.train.profile_steps='(10, 12)'"
            )
        if (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed < 2**63
        ):
            # numpy's generators refuse a negative seed, but only at the first batch.
            raise ConfigError(
                f"TrainConfig.seed = {self.seed!r} must be an integer in [0, 2**63); "
                "set --config.train.seed"
            )
        if self.unroll_layers not in ("auto", "yes", "no"):
            raise ConfigError(
                f"TrainConfig.unroll_layers = {self.unroll_layers!r} is unknown; use auto, yes "
                "or no (--config.train.unroll_layers)"
            )
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(
                f"TrainConfig.optimizer = {self.optimizer!r} is unknown; use 'adam' or 'adamw'"
            )
        if self.weight_decay > 0 and self.optimizer != "adamw":
            raise ConfigError(
                f"TrainConfig.weight_decay = {self.weight_decay} with optimizer = "
                f"{self.optimizer!r}, which has no weight decay (it would be ignored); add "
                "--config.train.optimizer=adamw, or drop the weight decay"
            )
        _check_precision(self)
        _check_batch_schedule(self)
        remats = (
            "none",
            "full",
            "dots_saveable",
            "dots_with_no_batch_dims_saveable",
            "everything_saveable",
        )
        if self.remat not in remats:
            raise ConfigError(
                f"TrainConfig.remat = {self.remat!r} is unknown; use one of {', '.join(remats)}"
            )
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v < 1.0:
                raise ConfigError(
                    f"TrainConfig.{name} = {v!r} must be a number in [0, 1) (Adam's decay "
                    f"rates: 0.9 and 0.95 by default); set --config.train.{name}"
                )
        if not _is_number(self.final_lr_ratio) or not 0.0 < self.final_lr_ratio <= 1.0:
            raise ConfigError(
                f"TrainConfig.final_lr_ratio = {self.final_lr_ratio!r} must be in (0, 1] (the "
                "cosine's end over the max LR; Gopher's is 0.1); set "
                "--config.train.final_lr_ratio"
            )
        # A non-finite LR or clip norm makes every update NaN while the step's loss and
        # gradient norm stay finite, so the guard keeps the NaN parameters and the run
        # only stops, as "diverged", max_bad_steps later.
        for name in ("max_lr", "clip_norm"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or v <= 0):
                raise ConfigError(
                    f"TrainConfig.{name} = {v!r} must be a finite number > 0 (or None for the "
                    f"model row's); set --config.train.{name}"
                )

    def batch_size_at(self, step: int) -> int:
        """Sequences in the global batch of (1-based) `step`, after the schedule's switches."""
        batch = self.batch_size
        for after, size in self.batch_schedule:
            if step > after:
                batch = size
        return batch

    def base_steps_seen(self, steps, maximum=max):
        """How many steps of `batch_size` sequences hold as many sequences as steps 1 ..
        `steps` did: `steps` itself without a schedule, more once the batch has grown. The
        unit in which the LR schedule and the data stream count tokens; pass
        `maximum=jnp.maximum` for a traced `steps`."""
        seen, ratio = steps, 1
        for after, size in self.batch_schedule:
            new = size // self.batch_size
            seen = seen + (new - ratio) * maximum(steps - after, 0)
            ratio = new
        return seen

    def sequences_seen(self, steps: int) -> int:
        """Sequences (global) that steps 1 .. `steps` consumed."""
        return self.batch_size * self.base_steps_seen(steps)

    def batch_sizes(self) -> tuple[int, ...]:
        """The distinct global batch sizes steps 1 .. `steps` use, in order."""
        sizes = [self.batch_size] + [b for after, b in self.batch_schedule if after < self.steps]
        return tuple(dict.fromkeys(sizes))


def steps_for_tokens(train: TrainConfig, seq_len: int, tokens: int = TRAIN_TOKENS) -> int:
    """The fewest steps whose sequences of `seq_len` tokens reach `tokens` (Gopher: 300B)
    under `train`'s batch schedule: 44m ceil(300e9 / (128 * 2048)) = 1,144,410; 280b
    47,684 steps of 1536 then 23,842 of 3072 = 71,526 (300,001,787,904 tokens)."""
    need = -(-tokens // (train.batch_size * seq_len))  # steps of batch_size sequences
    lo, hi = 0, need
    while lo < hi:  # base_steps_seen grows with the step: bisect it
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if train.base_steps_seen(mid) >= need else (mid + 1, hi)
    return lo


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is tokenized."""

    source: str = "stdlib"  # "stdlib", "files" or "embedded" (the MassiveText-like mixture)
    paths: tuple[str, ...] = ()
    heldout_fraction: float = 0.05
    tokenizer_path: str = ""  # empty: train one into the workdir
    tokenizer_sample_bytes: int = 4_000_000
    cache_dir: str = ""  # empty: WORKDIR/data
    corpus_dir: str = ""  # embedded: empty means ~/.cache/gopher/embedded-VOCAB, built on first use
    mixture: str = ""  # embedded: weights by name ("embedded", "massivetext"); empty: the corpus's

    def __post_init__(self):
        if self.source not in ("stdlib", "files", "embedded"):
            raise ConfigError(
                f"DataConfig.source = {self.source!r} is unknown; use 'stdlib', 'files' or "
                "'embedded'"
            )
        if (
            not isinstance(self.tokenizer_sample_bytes, int)
            or isinstance(self.tokenizer_sample_bytes, bool)
            or self.tokenizer_sample_bytes <= 0
        ):
            raise ConfigError(
                f"DataConfig.tokenizer_sample_bytes = {self.tokenizer_sample_bytes!r} must be "
                "a whole number of bytes > 0; set --config.data.tokenizer_sample_bytes (default "
                "4000000)"
            )
        if self.source == "files" and not self.paths:
            raise ConfigError(
                "DataConfig.paths is empty but source = 'files'; set --config.data.paths"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(
                f"DataConfig.heldout_fraction = {self.heldout_fraction!r} must be in (0, 1)"
            )


def _build(cls, values: Mapping[str, Any]):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(fields))}"
        )
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**kw)


def model_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    """A `ModelConfig` from {'preset': name, ...overrides}."""
    values = dict(values)
    preset = values.pop("preset", None)
    if preset:
        base = get_preset(preset)
        base_values = dataclasses.asdict(base)
        unknown = sorted(set(values) - set(base_values))
        if unknown:
            raise ConfigError(
                f"unknown ModelConfig field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(sorted(base_values))}"
            )
        overrides = {k: v for k, v in values.items() if v is not None}
        return base.replace(**overrides)
    return _build(ModelConfig, values)


def train_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    return _build(TrainConfig, values)


def data_from_dict(values: Mapping[str, Any]) -> DataConfig:
    return _build(DataConfig, values)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How a step is spread over devices.

    mode "jit" ("pjit"): one program over a Mesh(replica, data, model) with NamedShardings
    from the partition rules. mode "pmap": Gopher-style data parallelism with ZeRO-1 by hand.
    Axis sizes of -1 take the rest of the devices. zero: 0 replicated optimiser state,
    1 optimiser-state partitioning (Adam moments and fp32 master sharded over data),
    3 FSDP (parameters sharded over data as well).
    """

    mode: str = "jit"
    replica: int = 1
    data: int = -1
    model: int = 1
    zero: int = 0
    # How devices fill the mesh: "auto" (jax.make_mesh: each process's devices together)
    # or "interleave" (devices of different processes alternate along the model axis, so a
    # model group spans hosts; for testing the multi-host data feed).
    device_order: str = "auto"

    def __post_init__(self):
        if self.device_order not in ("auto", "interleave"):
            raise ConfigError(
                f"ParallelConfig.device_order = {self.device_order!r} is unknown; use 'auto' "
                "or 'interleave' (--config.parallel.device_order)"
            )
        if self.mode not in ("jit", "pmap"):
            raise ConfigError(
                f"ParallelConfig.mode = {self.mode!r} is unknown; use 'jit' or 'pmap' "
                f"(--config.parallel.mode)"
            )
        for name in ("replica", "data", "model"):
            v = getattr(self, name)
            if not isinstance(v, int) or (v < 1 and v != -1):
                raise ConfigError(
                    f"ParallelConfig.{name} = {v!r} must be a positive integer or -1 (the "
                    f"rest of the devices); set --config.parallel.{name}"
                )
        if [self.replica, self.data, self.model].count(-1) > 1:
            raise ConfigError(
                "ParallelConfig: at most one of replica, data, model may be -1; "
                "set the others explicitly"
            )
        if self.zero not in (0, 1, 3):
            raise ConfigError(
                f"ParallelConfig.zero = {self.zero!r} is unknown; use 0 (off), 1 (optimiser-"
                f"state partitioning) or 3 (FSDP) (--config.parallel.zero)"
            )
        if self.mode == "pmap" and self.model != 1 and self.model != -1:
            raise ConfigError(
                f"ParallelConfig.model = {self.model} but mode 'pmap' is data parallel only; "
                "use --config.parallel.mode=jit for model parallelism"
            )


def parallel_from_dict(values: Mapping[str, Any]) -> ParallelConfig:
    return _build(ParallelConfig, values)
