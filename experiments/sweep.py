"""The model-size sweep: train every (size, budget, seed) run, evaluate it, report.

  python -m experiments.sweep --config=experiments/configs/sweep.py:cpu
  python -m experiments.sweep --config=experiments/configs/sweep.py:cpu --dry_run
  python -m experiments.sweep --config=experiments/configs/sweep.py:cpu --report_only

Each run trains in its own `python -m experiments.train` process, in WORKDIR/runs/NAME
(default WORKDIR: runs/sweep_VARIANT), then is evaluated here: bits per byte of the first
`eval.heldout_docs` held-out documents of every source (each cut to `eval.doc_bytes`
bytes, the same documents for every run, kept per document for the bootstrap) and the
zero-shot tasks; the result goes to WORKDIR/runs/NAME/sweep_result.json. Then the report:
results table (markdown + CSV), power-law and Chinchilla fits with bootstrap intervals,
IsoFLOP minima and plots, into --results_dir (default results/sweep_VARIANT).

Resuming: run the same command again. A run with a result file is not redone; a run that
was training resumes from its newest checkpoint (experiments.train's own resume), and one
that trained but was not evaluated is only evaluated. SIGTERM / Ctrl-C stop the training
process the way a preemption does (it checkpoints) and exit 75 / 130.

Exit status: 0 done; 2 bad input (one line); 3 a run diverged; 75 / 130 stopped.
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

from absl import app, flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/sweep.py:cpu", "Sweep config file and variant."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs live (runs/sweep_VARIANT).")
_RESULTS = flags.DEFINE_string("results_dir", None, "Report dir (results/sweep_VARIANT).")
_ONLY = flags.DEFINE_list("only", [], "Train and evaluate only these runs (names).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the runs and their budgets; train none.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Report the finished runs; train none.")
_NO_REPORT = flags.DEFINE_bool("no_report", False, "Train and evaluate, but write no report.")
_PLAN_ONLY = flags.DEFINE_bool(
    "plan_only", False, "Compile each run's step for cfg.topology (experiments.plan); train none."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
_EVALUATE_RUN = flags.DEFINE_string(
    "evaluate_run", None, "Internal: evaluate this trained run and write its result file."
)

RESULT_FILE = "sweep_result.json"
PREEMPTED, INTERRUPTED = 75, 130


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

    def digest(self) -> str:
        """Identifies what the run trains: a result made under other settings is stale."""
        text = json.dumps([self.overrides, self.steps], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    if not 0.0 <= cfg.warmup_fraction <= 0.05:
        raise ValueError(
            f"warmup_fraction = {cfg.warmup_fraction} must be in [0, 0.05] (at most 5% of a "
            "run's steps; 0 for Gopher's 1,500 steps)"
        )
    runs = []
    for size in cfg.sizes:
        model = _model_config(cfg, size)
        batch = cfg.batch_size or model.batch_size
        batch_tokens = batch * model.seq_len
        per_token = metrics.flops_per_token(model)
        for budget in cfg.budgets:
            if size.get("budgets") and budget.name not in size.budgets:
                continue
            if bool(budget.tokens) == bool(budget.flops):
                raise ValueError(f"budget {budget.name!r} must set exactly one of tokens and flops")
            if budget.tokens:
                train = gopher_config.TrainConfig(
                    batch_size=batch, batch_schedule=model.batch_schedule
                )
                steps = gopher_config.steps_for_tokens(train, model.seq_len, budget.tokens)
            else:
                steps = math.ceil(budget.flops / (per_token * batch_tokens))
                train = gopher_config.TrainConfig(batch_size=batch)
            tokens = train.sequences_seen(steps) * model.seq_len
            warmup = max(1, int(cfg.warmup_fraction * steps)) if cfg.warmup_fraction else 1500
            lr = max_lr_for(cfg, model)
            precisions = tuple(cfg.get("precisions", ())) or (cfg.precision,)
            for precision, seed in [(p, x) for p in precisions for x in cfg.seeds]:
                name = f"{size.name}_{budget.name}"
                name += f"_{precision}" if len(precisions) > 1 else ""
                name += f"_s{seed}" if len(cfg.seeds) > 1 else ""
                skip = ""
                if steps < cfg.min_steps:
                    skip = f"{steps} steps < min_steps {cfg.min_steps}"
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
    import importlib.util

    path, _, preset = cfg.base.partition(":")
    spec = importlib.util.spec_from_file_location("_sweep_base", path)
    if spec is None or not os.path.exists(path):
        raise ValueError(f"base config {cfg.base!r} does not exist; set base to FILE:PRESET")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def check_repeats(cfg, runs: list[RunSpec], say) -> None:
    """Refuses a run that would see any source more than cfg.max_epochs times."""
    from gopher import config as gopher_config
    from gopher.data import pipeline

    base = base_config(cfg)
    if base.data.source != "embedded" or cfg.variant == "tpu":
        return
    corpus_dir = base.data.corpus_dir or pipeline.default_corpus_dir(cfg.vocab_size)
    manifest_path = os.path.join(corpus_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        say(f"note: {corpus_dir} is built by the first run; repeats are checked after it")
        return
    with open(manifest_path) as f:
        manifest = json.load(f)
    from gopher.data.mixture import EMBEDDED_WEIGHTS

    weights = dict(manifest.get("weights") or EMBEDDED_WEIGHTS)
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
    del gopher_config


# ------------------------------------------------------------------------- training


class _Child:
    """The training process; SIGTERM / SIGINT to the sweep go to it (it checkpoints)."""

    def __init__(self):
        self.proc = None
        self.signal = None

    def forward(self, signum, frame):
        del frame
        self.signal = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)


def _die_with_parent():  # the trainer gets SIGTERM (and checkpoints) if the sweep dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def train_run(cfg, run: RunSpec, run_dir: str, child: _Child, say) -> None:
    args = [sys.executable, "-m", "experiments.train", f"--config={cfg.base}"]
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
            args, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        code = child.proc.wait()
        child.proc = None
    if child.signal is not None or code in (PREEMPTED, INTERRUPTED):
        say(f"{run.name}: stopped (exit {code}); run the same command to resume")
        common.exit_now(PREEMPTED if child.signal != signal.SIGINT else INTERRUPTED)
    if code != 0:
        tail = _tail(log_path)
        raise RuntimeError(f"run {run.name} failed (exit {code}): {tail} (log: {log_path})")
    say(f"{run.name}: trained in {time.perf_counter() - start:.0f} s")


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


# ----------------------------------------------------------------------- evaluation


def heldout_texts(model_cfg, data_cfg, run_dir, docs: int, doc_bytes: int) -> dict:
    """{source: [text]}: the first `docs` held-out documents, each cut to `doc_bytes`."""
    from gopher.data.pipeline import heldout_documents

    out = {}
    for source, group in heldout_documents(model_cfg, data_cfg, run_dir).items():
        texts = []
        for d in group[:docs] if docs else group:
            text = d.text
            if doc_bytes and len(text.encode("utf-8")) > doc_bytes:
                text = text.encode("utf-8")[:doc_bytes].decode("utf-8", errors="ignore")
            if text:
                texts.append(text)
        if texts:
            out[source] = texts
    return out


def evaluate_run(cfg, run: RunSpec, run_dir: str, say) -> dict:
    """Held-out bpb (per document and source) and task accuracies of a trained run."""
    import numpy as np

    from gopher import inference
    from gopher.evals import harness, tasks
    from gopher.evals.scoring import Scorer

    start = time.perf_counter()
    model = inference.load(run_dir)
    if model.step != run.steps:
        raise RuntimeError(
            f"run {run.name}: newest checkpoint is step {model.step}, not {run.steps}"
        )
    n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(model.params))
    scorer = Scorer(model, batch_size=32)
    seq = model.model_cfg.seq_len
    texts = heldout_texts(
        model.model_cfg, model.data_cfg, run_dir, cfg.eval.heldout_docs, cfg.eval.doc_bytes
    )
    docs, by_source = [], {}
    total_nll = total_bytes = total_tokens = 0.0
    for source, group in texts.items():
        nll, count = scorer.text_nll(group, window=seq, stride=seq)
        nbytes = [len(t.encode("utf-8")) for t in group]
        for i in range(len(group)):
            docs.append([source, float(nll[i]), int(count[i]), nbytes[i]])
        by_source[source] = float(nll.sum() / (math.log(2) * sum(nbytes)))
        total_nll += float(nll.sum())
        total_bytes += sum(nbytes)
        total_tokens += int(count.sum())
    results = {}
    for name in tasks.parse_task_spec(cfg.eval.tasks) if cfg.eval.tasks else []:
        task = tasks.load_task(name, None, cfg.eval.limit or None)
        r = harness.evaluate_task(scorer, task)
        results[name] = {k: r[k] for k in ("accuracy", "chance", "items") if k in r}
    train_log = _train_records(run_dir)
    return {
        "name": run.name,
        "digest": run.digest(),
        "step": model.step,
        **{k: v for k, v in dataclasses.asdict(run).items() if k not in ("overrides", "skip")},
        "params_exact": n_params,
        "heldout_bpb": total_nll / (math.log(2) * total_bytes),
        "heldout_loss": total_nll / total_tokens,
        "heldout_tokens": int(total_tokens),
        "heldout_bytes": int(total_bytes),
        "bpb_by_source": by_source,
        "doc_losses": docs,  # [source, nll nats, tokens, bytes] per held-out document
        "tasks": results,
        "train_log": train_log,
        "eval_s": time.perf_counter() - start,
    }


def _train_records(run_dir: str) -> dict:
    """The run's loss curve and in-training evals, from its metrics.jsonl (last of each step)."""
    train, evals, seconds, last = {}, {}, 0.0, 0
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind") == "eval":
                    evals[rec["step"]] = rec["heldout_bpb"]
                elif rec.get("kind") == "train":
                    train[rec["step"]] = rec["loss"]
                    # Each record's median step time stands for the steps since the last.
                    seconds += rec.get("step_time_s", 0.0) * max(rec["step"] - last, 0)
                    last = rec["step"]
    except (OSError, ValueError):
        pass
    return {
        "steps": sorted(train),
        "loss": [train[s] for s in sorted(train)],
        "eval_steps": sorted(evals),
        "eval_bpb": [evals[s] for s in sorted(evals)],
        "train_s": seconds,  # steps x step time, from the log (restarts' compiles excluded)
    }


def evaluate_in_child(run: RunSpec, run_dir: str, child: _Child) -> None:
    """Evaluates in a process of its own: this one never loads jax, so that it can fork."""
    passed = [a for a in sys.argv[1:] if not a.startswith(_SWEEP_ONLY_FLAGS)]
    args = [sys.executable, "-m", "experiments.sweep", *passed, f"--evaluate_run={run.name}"]
    log_path = os.path.join(run_dir, "eval.log")
    with open(log_path, "a") as log:
        child.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        code = child.proc.wait()
        child.proc = None
    if child.signal is not None:
        common.exit_now(PREEMPTED if child.signal != signal.SIGINT else INTERRUPTED)
    if code != 0:
        raise RuntimeError(f"evaluating {run.name} failed (exit {code}): {_tail(log_path)}")


_SWEEP_ONLY_FLAGS = ("--only", "--dry_run", "--report_only", "--no_report", "--evaluate_run")


def evaluate_one(cfg, workdir: str, name: str, say) -> int:
    """The child of evaluate_in_child: evaluates run `name`, writes its result file."""
    runs = {r.name: r for r in plan_runs(cfg)}
    if name not in runs:
        raise ValueError(f"--evaluate_run={name} is not a run of this sweep")
    run_dir = os.path.join(workdir, "runs", name)
    result = evaluate_run(cfg, runs[name], run_dir, say)
    _write_json(os.path.join(run_dir, RESULT_FILE), result)
    return 0


def read_result(run: RunSpec, run_dir: str) -> dict | None:
    path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None  # a torn write: evaluated again
    return result if result.get("digest") == run.digest() else None


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def sweep(cfg, workdir: str, results_dir: str, say) -> int:
    runs = plan_runs(cfg)
    unknown = sorted(set(_ONLY.value) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"--only names unknown runs {unknown}; see --dry_run for the names")
    say(_plan_table(runs))
    if _DRY_RUN.value:
        return 0
    if _PLAN_ONLY.value:
        return plan_only(cfg, runs, say)
    check_repeats(cfg, runs, say)
    child = _Child()
    signal.signal(signal.SIGTERM, child.forward)
    signal.signal(signal.SIGINT, child.forward)
    done = []
    for run in runs:
        run_dir = os.path.join(workdir, "runs", run.name)
        if run.skip or (_ONLY.value and run.name not in _ONLY.value):
            continue
        result = read_result(run, run_dir)
        if result is not None:
            done.append(result)
            continue
        if _REPORT_ONLY.value:
            continue
        # A finished run's trainer restores its last checkpoint and stops at once.
        say(
            f"{run.name}: training {run.steps} steps ({run.tokens:,} tokens, {run.flops:.2e} FLOPs)"
        )
        train_run(cfg, run, run_dir, child, say)
        say(f"{run.name}: evaluating")
        evaluate_in_child(run, run_dir, child)
        result = read_result(run, run_dir)
        if result is None:
            raise RuntimeError(f"run {run.name}: evaluation wrote no result (see {run_dir})")
        say(
            f"{run.name}: held-out {result['heldout_bpb']:.4f} bits/byte "
            f"({result['eval_s']:.0f} s to evaluate)"
        )
        done.append(result)
    if not _NO_REPORT.value and done:
        from experiments import sweep_report

        sweep_report.write_report(cfg, runs, done, results_dir, say, workdir)
    return 0


def plan_only(cfg, runs: list[RunSpec], say) -> int:
    """Each run's train step compiled for cfg.topology by the planner: fits, GiB per device."""
    topology = cfg.get("topology", "")
    if not topology:
        raise ValueError(f"variant {cfg.variant!r} names no topology; --plan_only is for tpu")
    env = dict(os.environ)
    site = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv")
    site = os.path.join(site, "libtpu-site")  # where `make test-all` installs libtpu
    if os.path.isdir(site):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    rows, failed = [], []
    for run in runs:
        if _ONLY.value and run.name not in _ONLY.value:
            continue
        o = dict(run.overrides)
        args = [sys.executable, "-m", "experiments.plan", f"--config={cfg.base.split(':')[0]}:"]
        args[-1] += o.get("model.preset", "")
        args += [f"--topology={topology}", "--json"]
        for key in ("data", "model"):
            if f"parallel.{key}" in o:
                args.append(f"--{key}={o[f'parallel.{key}']}")
        if "parallel.zero" in o:
            args.append(f"--zero={o['parallel.zero']}")
        if "train.remat" in o:
            args.append(f"--remat={o['train.remat']}")
        args.append(f"--batch={o['train.batch_size']}")
        out = subprocess.run(args, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or [""])[-1]
            raise ValueError(f"planning {run.name} failed (exit {out.returncode}): {tail[:300]}")
        plan = json.loads(out.stdout.strip().splitlines()[-1])
        plan = plan.get("presets", {}).get(o.get("model.preset"), plan)
        gib = plan["per_device_bytes"]["total"] / 2**30
        hbm = plan["hbm_bytes"] / 2**30
        mesh = plan["mesh"]
        rows.append(
            f"| {run.name} | {mesh['data']} x {mesh['model']} | {plan['zero']} | {plan['remat']} "
            f"| {plan['batch']} | {gib:.2f} / {hbm:.0f} | {'fits' if plan['fits'] else 'OOM'} "
            f"| {plan['compile_seconds']:.0f} |"
        )
        say(rows[-1])
        if not plan["fits"]:
            failed.append(run.name)
    say(
        "| run | data x model | ZeRO | remat | batch | GiB per device | fits | compile s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    if failed:
        raise ValueError(
            f"{', '.join(failed)} do not fit {topology}; change their mesh in the config"
        )
    return 0


def _plan_table(runs: list[RunSpec]) -> str:
    lines = ["| run | params | non-emb | steps | tokens | FLOPs | max LR | warm-up | note |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        lines.append(
            f"| {r.name} | {r.params:,} | {r.nonembedding_params:,} | {r.steps} | "
            f"{r.tokens:,} | {r.flops:.2e} | {r.max_lr:.2e} | {r.warmup_steps} | {r.skip} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    if not _VERBOSE.value:
        from absl import logging

        logging.set_verbosity(logging.FATAL)  # Orbax's INFO lines on every restore
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", f"sweep_{cfg.variant}")
    results_dir = _RESULTS.value or os.path.join("results", f"sweep_{cfg.variant}")

    def say(message):
        print(message, flush=True)

    with common.user_errors(_VERBOSE.value):
        try:
            if _EVALUATE_RUN.value:
                return evaluate_one(cfg, workdir, _EVALUATE_RUN.value, say)
            return sweep(cfg, workdir, results_dir, say)
        except RuntimeError as e:
            if _VERBOSE.value:
                raise
            common.fail(str(e), code=3)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
