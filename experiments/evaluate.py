"""Evaluate a trained run: zero-shot tasks and bits per byte of held-out and given text.

  python -m experiments.evaluate --workdir=DIR --tasks=lambada,piqa|all [--limit=N]
      [--heldout [--heldout_docs=N]] [--text_files=a.txt,b.txt] [--batch_size=32] [--step=N] [--json]
      [--out=FILE]

Loads the newest checkpoint of DIR (or --step) with gopher.inference.load onto all local
devices, scores each task (gopher/evals/harness.py; items from gopher/evals/tasks.py,
fetched on first use, or file:PATH for a JSON-lines task) and, with --heldout, the
held-out split of each of the run's data sources, and each --text_files file as one
document, in bits per byte at windows of 1x, 1.5x and 2x the model's seq_len.

Prints a markdown table (task, split, items, metrics, chance) or, with --json, one JSON
object {task: {"accuracy" or "bpb", "chance", other metrics}}; writes them with the step
and timings to --out, and into WORKDIR/eval/step_<N>.json (which keeps the results of
earlier runs for other tasks at that step). Progress and
compile vs run time go to stderr. Exit status 2 on bad input (one line `error: ...`).
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags, logging

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_TASKS = flags.DEFINE_string("tasks", "", "Tasks: names, all, or file:PATH, comma-separated.")
_LIMIT = flags.DEFINE_integer("limit", None, "Score only the first N items of each task.")
_TEXT_FILES = flags.DEFINE_list("text_files", [], "Text files to report bits per byte of.")
_HELDOUT = flags.DEFINE_bool("heldout", False, "Bits per byte of the run's held-out split.")
_HELDOUT_DOCS = flags.DEFINE_integer(
    "heldout_docs", None, "With --heldout: only the first N documents of each source."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows of seq_len tokens per batch.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a markdown table.")
_OUT = flags.DEFINE_string("out", None, "Also write the results JSON to this file.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Where task files are cached.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_flags() -> None:
    if not _WORKDIR.value:
        common.fail("--workdir is required; pass the --workdir of a training run")
    if not (_TASKS.value or _HELDOUT.value or _TEXT_FILES.value):
        common.fail("nothing to evaluate; pass --tasks=all (or names), --heldout or --text_files")
    if _LIMIT.value is not None and _LIMIT.value < 1:
        common.fail(f"--limit={_LIMIT.value} must be >= 1; omit it to score every item")
    if _HELDOUT_DOCS.value is not None and _HELDOUT_DOCS.value < 1:
        common.fail(f"--heldout_docs={_HELDOUT_DOCS.value} must be >= 1; omit it for them all")
    if _BATCH_SIZE.value < 1:
        common.fail(f"--batch_size={_BATCH_SIZE.value} must be >= 1; e.g. --batch_size=32")
    if _STEP.value is not None and _STEP.value < 0:
        common.fail(f"--step={_STEP.value} must be >= 0; omit it for the newest checkpoint")


def read_text_file(path: str) -> str:
    """A --text_files file, as one document."""
    from gopher import paths

    file = paths.resolve(path)
    if not file.is_file():
        raise ValueError(f"text file {path!r} does not exist; fix --text_files")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"text file {path!r} is not UTF-8; convert it or drop it") from None
    if not text:
        raise ValueError(f"text file {path!r} is empty; drop it from --text_files")
    return text


def evaluate() -> dict:
    from gopher.evals import tasks

    # Tasks and files first: a bad name fails before jax loads and the model restores.
    names = tasks.parse_task_spec(_TASKS.value) if _TASKS.value else []
    loaded = {name: tasks.load_task(name, _CACHE_DIR.value, _LIMIT.value) for name in names}
    texts = {f"text/{p}": read_text_file(p) for p in _TEXT_FILES.value}
    t0 = time.perf_counter()
    import jax

    from gopher import inference, paths
    from gopher.data.pipeline import heldout_documents
    from gopher.evals import harness
    from gopher.evals.scoring import Scorer

    if jax.process_count() > 1:
        raise ValueError("evaluate runs in one process; start it on one host only")
    model = inference.load(_WORKDIR.value, step=_STEP.value)
    say(f"loaded step {model.step} of {_WORKDIR.value} in {time.perf_counter() - t0:.1f} s")
    scorer = Scorer(model, batch_size=_BATCH_SIZE.value, log=_throttled(say, 10.0))
    results: dict = {}
    for name, task in loaded.items():
        say(f"{name}: {len(task.items)} items ({task.split})")
        key = task.name if name.startswith("file:") else name
        results[key] = harness.evaluate_task(scorer, task)
        _say_done(key, results[key])
    sources = {}
    if _HELDOUT.value:
        docs = heldout_documents(model.model_cfg, model.data_cfg, _WORKDIR.value)
        cut = slice(_HELDOUT_DOCS.value)
        sources = {f"heldout/{s}": [d.text for d in ds[cut]] for s, ds in docs.items() if ds}
    for name, group in {**sources, **{k: [v] for k, v in texts.items()}}.items():
        say(f"{name}: {len(group)} documents")
        results[name] = harness.evaluate_text(scorer, group)
        results[name]["split"] = "heldout" if name.startswith("heldout/") else "file"
        _say_done(name, results[name])
    timings = dict(vars(scorer.timings), total_s=time.perf_counter() - t0)
    say(
        f"compile {timings['compile_s']:.1f} s ({timings['compiles']} programs), run "
        f"{timings['run_s']:.1f} s ({timings['tokens']:,} positions), total "
        f"{timings['total_s']:.1f} s (with loading and tokenising)"
    )
    record = {"step": model.step, "workdir": _WORKDIR.value, "tasks": results, "timings": timings}
    if _OUT.value:
        paths.write_atomic(_OUT.value, (json.dumps(record, indent=1) + "\n").encode())
    # The step's file keeps earlier runs' results for other tasks (this run's replace its own).
    step_file = paths.resolve(paths.join(_WORKDIR.value, "eval", f"step_{model.step}.json"))
    try:
        earlier = json.loads(step_file.read_text())["tasks"] if step_file.exists() else {}
    except (OSError, ValueError, KeyError, TypeError):
        say(f"warning: {step_file} is unreadable; it is rewritten with this run's results")
        earlier = {}
    record = dict(record, tasks={**earlier, **results})
    paths.write_atomic(str(step_file), (json.dumps(record, indent=1) + "\n").encode())
    return results


def _throttled(log, every_s: float):
    """log, at most once every `every_s` seconds (progress of long tasks)."""
    last = [time.perf_counter()]

    def maybe(message: str) -> None:
        if time.perf_counter() - last[0] >= every_s:
            last[0] = time.perf_counter()
            log(f"  {message}")

    return maybe


def _say_done(name: str, r: dict) -> None:
    main = f"bpb {r['bpb']:.4f}" if "bpb" in r else f"accuracy {r['accuracy']:.4f}"
    say(
        f"  {name}: {main} (chance {r['chance']:.4f}); compile {r['compile_s']:.1f} s, "
        f"run {r['run_s']:.1f} s"
    )


def main(argv):
    del argv
    if not _VERBOSE.value:
        logging.set_verbosity(logging.FATAL)  # Orbax's INFO and warnings on restore
    _check_flags()
    with common.user_errors(_VERBOSE.value):
        results = evaluate()
    if _JSON.value:
        print(json.dumps(results))
    else:
        from gopher.evals import harness

        print(harness.markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
