"""The model-size sweep: train every (size, budget, seed) run, evaluate it, report.

  python -m experiments.sweep --config=experiments/configs/sweep.py:cpu
  python -m experiments.sweep --config=experiments/configs/sweep.py:cpu --dry_run
  python -m experiments.sweep --config=experiments/configs/sweep.py:cpu --report_only

Each run trains in its own `python -m experiments.train` process, in WORKDIR/runs/NAME
(default WORKDIR: runs/sweep_VARIANT), then is evaluated here: bits per byte of the first
`eval.heldout_docs` held-out documents of every source (each cut to `eval.doc_bytes`
bytes at a word boundary, a cut one scored without an end-of-document token; the same
documents for every run, kept per document for the bootstrap) and the zero-shot tasks; the result goes to WORKDIR/runs/NAME/sweep_result.json. Then the report:
results table (markdown + CSV), power-law and Chinchilla fits with bootstrap intervals,
IsoFLOP minima and plots, into --results_dir (default results/sweep_VARIANT).

Run names: SIZE_BUDGET, then _sSEED for a seed other than 0; with a `precisions` axis
(the ablation) SIZE_BUDGET_PRECISION_sSEED for every run. Adding seeds keeps the names.

Resuming: run the same command again. A run with a result file is not redone while what
it trains (its base config with the sweep's overrides) and how it is evaluated (`eval`,
and sweep_eval.EVAL_METHOD) are unchanged; a run that was training resumes from its newest checkpoint
(experiments.train's own resume), and one that trained but was not evaluated is only
evaluated. A result made under other eval settings is evaluated again; one made under
another training config goes back to the trainer, which resumes the same experiment (a
no-op when it is done) and refuses another one in a workdir with checkpoints (use a new
--workdir). SIGTERM / Ctrl-C stop the training process the way a preemption does (it
checkpoints) and exit 75 / 130. --only trains and evaluates the named runs; the report
still holds every run with a current result.

Exit status: 0 done; 2 bad input (one line), a run's config included (its trainer refused
it); a failed run exits with its trainer's or evaluator's status, in one line naming the
run and its log: 3 diverged, 4 no checkpoint could be restored, 5 another process holds
the run's workdir (retry once it is gone), 6 a process of the job died, 7 the storage kept
failing (rerun as it is), 128 + N killed by signal N; 1 anything else (the line says
what); 75 / 130 stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.sweep_eval import (
    EVAL_CHANGED,
    RESULT_FILE,
    evaluate_run,
    read_result,
    stale_reason,
    write_json,
)
from experiments.sweep_lib import (
    INTERRUPTED,
    PREEMPTED,
    Child,
    RunFailed,
    RunSpec,
    check_repeats,
    child_failed,
    die_with_parent,
    plan_runs,
    plan_table,
    train_run,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/sweep.py:cpu", "Sweep config file and variant."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs live (runs/sweep_VARIANT).")
_RESULTS = flags.DEFINE_string("results_dir", None, "Report dir (results/sweep_VARIANT).")
_ONLY = flags.DEFINE_list(
    "only", [], "Train and evaluate only these runs (names); the report holds every run."
)
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


def evaluate_in_child(run: RunSpec, run_dir: str, child: Child) -> None:
    """Evaluates in a process of its own: this one never loads jax, so that it can fork."""
    passed = [a for a in sys.argv[1:] if not a.startswith(_SWEEP_ONLY_FLAGS)]
    args = [sys.executable, "-m", "experiments.sweep", *passed, f"--evaluate_run={run.name}"]
    log_path = os.path.join(run_dir, "eval.log")
    with open(log_path, "a") as log:
        child.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        code = child.proc.wait()
        child.proc = None
    if child.signal is not None:
        common.exit_now(PREEMPTED if child.signal != signal.SIGINT else INTERRUPTED)
    if code != 0:
        raise child_failed(f"evaluating {run.name}", code, log_path)


_SWEEP_ONLY_FLAGS = ("--only", "--dry_run", "--report_only", "--no_report", "--evaluate_run")


def evaluate_one(cfg, workdir: str, name: str, say) -> int:
    """The child of evaluate_in_child: evaluates run `name`, writes its result file."""
    runs = {r.name: r for r in plan_runs(cfg)}
    if name not in runs:
        raise ValueError(f"--evaluate_run={name} is not a run of this sweep")
    run_dir = os.path.join(workdir, "runs", name)
    result = evaluate_run(cfg, runs[name], run_dir, say)
    write_json(os.path.join(run_dir, RESULT_FILE), result)
    return 0


# --------------------------------------------------------------------------- main


def sweep(cfg, workdir: str, results_dir: str, say) -> int:
    runs = plan_runs(cfg)
    unknown = sorted(set(_ONLY.value) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"--only names unknown runs {unknown}; see --dry_run for the names")
    say(plan_table(runs))
    if _DRY_RUN.value:
        return 0
    if _PLAN_ONLY.value:
        return plan_only(cfg, runs, say)
    check_repeats(cfg, runs, say)
    child = Child()
    signal.signal(signal.SIGTERM, child.forward)
    signal.signal(signal.SIGINT, child.forward)
    done = []
    for run in runs:
        run_dir = os.path.join(workdir, "runs", run.name)
        if run.skip:
            continue
        result = read_result(run, run_dir)
        if result is not None:
            done.append(result)  # --only or not: the report holds every finished run
            continue
        why = stale_reason(run, run_dir)
        if _REPORT_ONLY.value or (_ONLY.value and run.name not in _ONLY.value):
            if why:
                redo = "without --report_only" if _REPORT_ONLY.value else "with it in --only"
                say(f"{run.name}: its result is not reported ({why}); run the sweep {redo}")
            continue
        if why == EVAL_CHANGED:  # trained as now: evaluated again, not trained
            say(f"{run.name}: {why}; evaluating it again")
        else:
            if why:
                say(f"{run.name}: {why}; its trainer resumes it if it is the same experiment")
            # A finished run's trainer restores its last checkpoint and stops at once.
            say(
                f"{run.name}: training {run.steps} steps ({run.tokens:,} tokens, "
                f"{run.flops:.2e} FLOPs)"
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
    if _NO_REPORT.value:
        return 0
    if not done:
        say(f"no run of this sweep has a current result in {workdir}; no report written")
        return 0
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
        args = [sys.executable, "-m", "experiments.plan", f"--config={run.base}"]
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
        except RunFailed as e:  # the child's status: 2 bad input, 3 diverged, 4, 5, 7 ...
            if _VERBOSE.value:
                raise
            common.fail(str(e), code=e.code)
        except RuntimeError as e:  # a run failed otherwise (the line says what)
            if _VERBOSE.value:
                raise
            common.fail(str(e), code=1)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
