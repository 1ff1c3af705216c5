"""The sweep's pieces without its command line: the plan and training a run (evaluating
it is experiments/sweep_eval.py).

experiments/sweep.py is the command; tests import this module (absl flags are defined
once per process, and several experiments define --workdir).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

from experiments import common

PREEMPTED, INTERRUPTED = 75, 130
MAX_WARMUP_FRACTION = 0.05  # a run's warm-up is at most this share of its steps


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: a model size trained for one budget with one seed."""

    name: str
    size: str
    budget: str
    seed: int
    precision: str
    overrides: tuple[tuple[str, object], ...]  # --config.KEY=VALUE for experiments.train
    steps: int
    tokens: int
    flops: float  # training FLOPs, 6N + 12 L H Q T per token
    params: int  # 13 d^2 L + V d (the tied embedding once)
    nonembedding_params: int  # 13 d^2 L (Kaplan et al.'s N)
    max_lr: float
    warmup_steps: int
    skip: str = ""  # why the run is not trained ("" : it is)
    base: str = ""  # --config=FILE[:PRESET] its trainer starts from (a preset size: its own)
    train_digest: str = ""  # what it trains: the base config with the overrides, and steps
    eval_digest: str = ""  # how it is evaluated: the sweep's `eval` settings

    def digest(self) -> str:
        """Identifies what the run trains and how it is evaluated: a result made under
        other settings is stale."""
        return _sha([self.train_digest, self.eval_digest])


def _sha(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolved_config(base, overrides) -> dict:
    """The config a run's trainer builds, as a plain dict: the base config (a ConfigDict)
    with each --config.KEY=VALUE of `overrides` set."""
    out = base.to_dict()
    for key, value in overrides:
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


def train_digest(resolved: dict, steps: int) -> str:
    """What a run trains: its resolved config less the fields a restart may change without
    making it another experiment (gopher.workdir.MUTABLE: cadence, layout, paths), and its
    steps (which the sweep fixes, though a restart may change them)."""
    from gopher.workdir import MUTABLE

    kept = {
        section: {k: v for k, v in fields.items() if k not in MUTABLE.get(section, ())}
        if isinstance(fields, dict)
        else fields
        for section, fields in resolved.items()
    }
    return _sha([kept, steps])


def _model_config(cfg, size):
    from gopher import config as gopher_config

    if size.preset:
        model = gopher_config.get_preset(size.preset)
    else:
        model = gopher_config.ModelConfig(
            size.num_layers,
            size.num_heads,
            size.key_size,
            size.d_model,
            vocab_size=cfg.vocab_size,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            name=size.name,
        )
    return model.replace(seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)


def max_lr_for(cfg, model) -> float:
    """The config's learning-rate rule (0: the table row's own max LR)."""
    if not cfg.lr_base:
        return model.max_lr
    return cfg.lr_base * (cfg.lr_ref_d_model / model.d_model) ** cfg.lr_exponent


def plan_runs(cfg) -> list[RunSpec]:
    """Every (size, budget, seed) of the config, with its steps, tokens and FLOPs."""
    from gopher import config as gopher_config
    from gopher import metrics

    if not cfg.sizes or not cfg.budgets or not cfg.seeds:
        raise ValueError("the sweep config needs sizes, budgets and seeds; see sweep.py")
    if not 0.0 <= cfg.warmup_fraction <= MAX_WARMUP_FRACTION:
        raise ValueError(
            f"warmup_fraction = {cfg.warmup_fraction} must be in [0, {MAX_WARMUP_FRACTION}] "
            "(at most 5% of a run's steps; 0 for Gopher's 1,500 steps, in runs of 30,000 "
            "steps or more)"
        )
    for budget in cfg.budgets:
        if bool(budget.tokens) == bool(budget.flops):
            raise ValueError(f"budget {budget.name!r} must set exactly one of tokens and flops")
    token_budgets = [b.name for b in cfg.budgets if b.tokens]
    if len(token_budgets) > 1:
        raise ValueError(
            f"budgets {', '.join(token_budgets)} all set tokens, but the report fits one "
            "token-matched L(N) and would pool them; keep one token budget (sweep the other "
            "in a config of its own)"
        )
    # An axis the config declares is named in every run: `precisions` (the ablation) gives
    # _PRECISION and _sSEED for each run; otherwise seed 0 is unnamed and any other seed is
    # _sSEED. A name so never changes when seeds or settings are added to a sweep.
    precision_axis = tuple(cfg.get("precisions", ()))
    precisions = precision_axis or (cfg.precision,)
    path = cfg.base.partition(":")[0]
    eval_digest = _sha(cfg.eval.to_dict() if hasattr(cfg.eval, "to_dict") else dict(cfg.eval))
    bases: dict = {}
    runs = []
    for size in cfg.sizes:
        model = _model_config(cfg, size)
        batch = cfg.batch_size or model.batch_size
        batch_tokens = batch * model.seq_len
        per_token = metrics.flops_per_token(model)
        for budget in cfg.budgets:
            if size.get("budgets") and budget.name not in size.budgets:
                continue
            if budget.tokens:
                train = gopher_config.TrainConfig(
                    batch_size=batch, batch_schedule=model.batch_schedule
                )
                steps = gopher_config.steps_for_tokens(train, model.seq_len, budget.tokens)
            else:
                steps = math.ceil(budget.flops / (per_token * batch_tokens))
                train = gopher_config.TrainConfig(batch_size=batch)
            tokens = train.sequences_seen(steps) * model.seq_len
            # At most warmup_fraction of the run (5%): none for a run under 1 / fraction steps.
            warmup = int(cfg.warmup_fraction * steps) if cfg.warmup_fraction else 1500
            lr = max_lr_for(cfg, model)
            # A table row starts from its own config (FILE:PRESET): its shape and its recipe
            # (max LR, batch, clip norm, precision) are the train section's there.
            base = f"{path}:{size.preset}" if size.preset else cfg.base
            if base not in bases:
                bases[base] = load_config(base)
            for precision, seed in [(p, x) for p in precisions for x in cfg.seeds]:
                name = f"{size.name}_{budget.name}"
                name += f"_{precision}" if precision_axis else ""
                name += f"_s{seed}" if precision_axis or seed != 0 else ""
                skip = ""
                if steps < cfg.min_steps:
                    skip = f"{steps} steps < min_steps {cfg.min_steps}"
                elif warmup > MAX_WARMUP_FRACTION * steps:
                    raise ValueError(
                        f"run {name}: {warmup} warm-up steps are more than "
                        f"{MAX_WARMUP_FRACTION:.0%} of its {steps} steps (warmup_fraction = 0 "
                        "is Gopher's 1,500); set --config.warmup_fraction=0.05"
                    )
                overrides = _run_overrides(
                    cfg, size, model, batch, steps, warmup, lr, seed, precision
                )
                runs.append(
                    RunSpec(
                        name=name,
                        size=size.name,
                        budget=budget.name,
                        seed=seed,
                        precision=precision or model.precision,
                        overrides=overrides,
                        steps=steps,
                        tokens=tokens,
                        flops=per_token * tokens,
                        params=model.param_count_formula(),
                        nonembedding_params=13 * model.d_model**2 * model.num_layers,
                        max_lr=lr,
                        warmup_steps=warmup,
                        skip=skip,
                        base=base,
                        train_digest=train_digest(resolved_config(bases[base], overrides), steps),
                        eval_digest=eval_digest,
                    )
                )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("two runs of the sweep share a name; give sizes and budgets unique names")
    return runs


def _run_overrides(cfg, size, model, batch, steps, warmup, lr, seed, precision) -> tuple:
    out: dict[str, object] = {}
    if size.preset:
        out["model.preset"] = size.preset
    else:
        for key in ("num_layers", "num_heads", "key_size", "d_model"):
            out[f"model.{key}"] = getattr(size, key)
        out["model.name"] = size.name
    out["model.seq_len"] = model.seq_len
    out["model.vocab_size"] = model.vocab_size
    out["train.batch_size"] = batch
    out["train.steps"] = steps
    out["train.warmup_steps"] = warmup
    out["train.max_lr"] = lr
    out["train.final_lr_ratio"] = cfg.final_lr_ratio
    out["train.seed"] = seed
    if precision:
        out["train.precision"] = precision
    every = max(1, steps // max(1, cfg.evals_per_run))
    out["train.eval_every"] = every
    out["train.log_every"] = max(1, min(10, every))
    out["train.checkpoint_every"] = max(every, 1)
    for key, value in (*cfg.overrides, *size.overrides):
        out[key] = value
    return tuple(sorted(out.items()))


def base_config(cfg):
    """The experiment config each run starts from (cfg.base, FILE:PRESET)."""
    return load_config(cfg.base)


def load_config(spec: str):
    """The experiment config FILE:PRESET names (FILE's get_config(PRESET))."""
    import importlib.util

    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_sweep_base", path)
    if module_spec is None or not os.path.isfile(path):
        raise ValueError(f"base config {spec!r} does not exist; set base to FILE:PRESET")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def check_repeats(cfg, runs: list[RunSpec], say) -> None:
    """Refuses a run that would see any source more than cfg.max_epochs times, under the
    mixture the runs train on (the base config's, with the sweep's data.* overrides). A
    missing corpus is built first, as the first run would build it."""
    from gopher.data import build, pipeline

    base = base_config(cfg)
    data = {**dict(base.data), **{k[5:]: v for k, v in cfg.overrides if k.startswith("data.")}}
    if data.get("source") != "embedded" or cfg.variant == "tpu":
        return
    corpus_dir = data.get("corpus_dir") or pipeline.default_corpus_dir(cfg.vocab_size)
    manifest_path = os.path.join(corpus_dir, "manifest.json")
    if not os.path.exists(manifest_path):  # as the first run would build it, but before it
        say(f"building the embedded corpus into {corpus_dir} to check repeats (first sweep only)")
        build.build_embedded_corpus(corpus_dir, cfg.vocab_size, log=say)
    with open(manifest_path) as f:
        manifest = json.load(f)
    from gopher.data.proportions import EMBEDDED_WEIGHTS, named_weights, parse_weights

    weights = parse_weights(str(data.get("mixture") or ""))
    if weights is None:
        weights = dict(manifest.get("weights") or EMBEDDED_WEIGHTS)
    elif isinstance(weights, str):
        weights = named_weights(weights, manifest["sources"])
    total = sum(weights.values())
    worst = []
    for run in runs:
        if run.skip:
            continue
        for source, entry in manifest["sources"].items():
            tokens = entry["train"]["tokens"]
            epochs = run.tokens * weights.get(source, 0.0) / total / max(tokens, 1)
            worst.append((epochs, run.name, source))
            if epochs > cfg.max_epochs:
                raise ValueError(
                    f"run {run.name} would read source {source!r} {epochs:.1f} times "
                    f"(max_epochs {cfg.max_epochs}); lower its budget or raise max_epochs"
                )
    if worst:
        epochs, name, source = max(worst)
        say(f"most repeated source: {source} {epochs:.2f} epochs in {name} (max {cfg.max_epochs})")


# ------------------------------------------------------------------------- training


class Child:
    """The training process; SIGTERM / SIGINT to the sweep go to it (it checkpoints)."""

    def __init__(self):
        self.proc = None
        self.signal = None

    def forward(self, signum, frame):
        del frame
        self.signal = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)


def die_with_parent():  # the trainer gets SIGTERM (and checkpoints) if the sweep dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class RunFailed(RuntimeError):
    """A run's trainer or evaluator failed; `code` is its exit status (the sweep's)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def child_failed(what: str, code: int, log_path: str) -> RunFailed:
    """The failure of a child that exited `code`: its last error line, and its status (a
    child killed by signal N: 128 + N, as a shell reports it)."""
    tail = log_tail(log_path).removeprefix("error: ")
    return RunFailed(
        f"{what} failed (exit {code}): {tail} (log: {log_path})", code if code > 0 else 128 - code
    )


def train_run(cfg, run: RunSpec, run_dir: str, child: Child, say) -> None:
    args = [sys.executable, "-m", "experiments.train", f"--config={run.base or cfg.base}"]
    args += [f"--workdir={run_dir}"]
    args += [f"--config.{k}={v}" for k, v in run.overrides]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "sweep_command.txt"), "w") as f:
        f.write(" ".join(args[1:]) + "\n")
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    log_path = os.path.join(run_dir, "train.log")
    start = time.perf_counter()
    with open(log_path, "a") as log:
        child.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
        )
        code = child.proc.wait()
        child.proc = None
    if child.signal is not None or code in (PREEMPTED, INTERRUPTED):
        say(f"{run.name}: stopped (exit {code}); run the same command to resume")
        common.exit_now(PREEMPTED if child.signal != signal.SIGINT else INTERRUPTED)
    if code != 0:
        raise child_failed(f"run {run.name}", code, log_path)
    say(f"{run.name}: trained in {time.perf_counter() - start:.0f} s")


def log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


def plan_table(runs: list[RunSpec]) -> str:
    lines = ["| run | params | non-emb | steps | tokens | FLOPs | max LR | warm-up | note |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        lines.append(
            f"| {r.name} | {r.params:,} | {r.nonembedding_params:,} | {r.steps} | "
            f"{r.tokens:,} | {r.flops:.2e} | {r.max_lr:.2e} | {r.warmup_steps} | {r.skip} |"
        )
    return "\n".join(lines)
