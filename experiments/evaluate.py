"""Evaluate a trained run: zero-shot tasks and bits per byte of held-out and given text.

  python -m experiments.evaluate --workdir=DIR --tasks=lambada,piqa|all [--limit=N]
      [--heldout [--heldout_docs=N] [--data_paths=DIR,...]] [--text_files=a.txt,b.txt]
      [--batch_size=32] [--max_len=N] [--step=N] [--json] [--out=FILE]

Loads the newest checkpoint of DIR (or --step) with gopher.inference.load onto all local
devices, scores each task (gopher/evals/harness.py; items from gopher/evals/tasks.py,
fetched on first use, or file:PATH for a JSON-lines task) and, with --heldout, the
held-out split of each of the run's data sources, and each --text_files file as one
document, in bits per byte at windows of 1x, 1.5x and 2x the model's seq_len.

A task item longer than --max_len tokens (default 4 x seq_len) loses the start of its
context; an item whose continuation alone is longer is skipped. Both are counted per task
(truncated_requests, skipped_items) and shown in the table, as are the requests run at
more than the training seq_len (extrapolated_requests). --max_len bounds task rows only:
text windows are 1x, 1.5x and 2x seq_len whatever it is.

Held-out bpb here scores each document as its own stream, windows at stride window/2,
every document (or the first --heldout_docs of each source); each result records its
window, stride, documents, heldout_docs and streams. It is not the in-training
heldout_bpb (one packed stream, non-overlapping windows, the first eval_batches batches):
that one gives its targets less context and reads other text, so the numbers differ.

Reads the run and changes nothing in it but WORKDIR/eval/: an unreadable newest checkpoint
is skipped with a one-line warning (training quarantines it, not this), and a
restart_from_scratch in progress stays in progress.

Writes WORKDIR/eval/step_<N>.json after each task (it keeps the results of earlier runs
for other tasks at that step, so a failure later loses nothing scored; each result says
how it was made: a task its limit, max_len and batch_size, a text its window, stride,
batch_size and, held out, heldout_docs; None = every item or document), then prints a
markdown table (task, split, items, metrics, chance) or, with --json, one JSON object
{task: {"accuracy" or "bpb", "chance", other metrics}}, then writes them with the step and
timings to --out (checked before anything is scored). Progress and compile vs run time go
to stderr. Exit status 2 on bad input (one line `error: ...`).
"""

from __future__ import annotations

import json
import os
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
_DATA_PATHS = flags.DEFINE_list(
    "data_paths",
    None,
    "With --heldout, a source=files run: read its data from these paths (where it is now) "
    "instead of config.json's data.paths. Give the same files, moved.",
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    32,
    "Rows of seq_len tokens per batch (rounded up to a multiple of the data devices); "
    "longer rows go fewer per batch, but never fewer than one per data device, so a "
    "batch of rows L tokens long holds up to max(batch_size x seq_len, data devices x L) "
    "positions: with many devices, lower --max_len, not this, to bound memory.",
)
_MAX_LEN = flags.DEFINE_integer(
    "max_len",
    None,
    "Longest (context + continuation) row of a task request, in tokens (default 4 x the "
    "model's seq_len); longer ones lose the start of their context. Text bpb windows are "
    "1x, 1.5x and 2x seq_len regardless.",
)
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
    if _HELDOUT_DOCS.value is not None:
        if not _HELDOUT.value:  # it would be ignored silently
            common.fail(
                f"--heldout_docs={_HELDOUT_DOCS.value} only limits --heldout; add --heldout "
                "or drop it"
            )
        if _HELDOUT_DOCS.value < 1:
            common.fail(f"--heldout_docs={_HELDOUT_DOCS.value} must be >= 1; omit it for them all")
    if _BATCH_SIZE.value < 1:
        common.fail(f"--batch_size={_BATCH_SIZE.value} must be >= 1; e.g. --batch_size=32")
    if _STEP.value is not None and _STEP.value < 0:
        common.fail(f"--step={_STEP.value} must be >= 0; omit it for the newest checkpoint")
    if _MAX_LEN.value is not None and _MAX_LEN.value < 1:
        common.fail(f"--max_len={_MAX_LEN.value} must be >= 1; omit it for 4 x seq_len")
    if _DATA_PATHS.value is not None:
        if not _HELDOUT.value:
            common.fail(
                "--data_paths only says where --heldout reads the run's data; add --heldout"
            )
        if not _DATA_PATHS.value:
            common.fail("--data_paths is empty; pass the directories or files the run trained on")
        for path in _DATA_PATHS.value:
            if "://" not in path and not os.path.exists(os.path.expanduser(path)):
                common.fail(f"--data_paths: {path!r} does not exist; pass where the data is now")
    if _OUT.value is not None:
        _check_out(_OUT.value)


def _check_out(out: str) -> None:
    """--out must be a file we can create: before scoring, not after (remote: at the end)."""
    if not out:
        common.fail("--out is empty; pass a file path, e.g. --out=results.json")
    if "://" in out:
        return
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(path):
        common.fail(
            f"--out={out} is a directory; pass a file path, e.g. --out={out.rstrip('/')}/results.json"
        )
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest existing ancestor is what decides
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        common.fail(
            f"--out={out} cannot be created: {parent} is a file, not a directory; pass another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        common.fail(f"--out={out} cannot be created: {parent} is not writable; pass another path")


def read_text_file(path: str) -> str:
    """A --text_files file, as one document."""
    from gopher import paths

    file = paths.resolve(path)
    if file.is_dir():
        raise ValueError(f"text file {path!r} is a directory; pass the files in it")
    if not file.is_file():
        raise ValueError(f"text file {path!r} does not exist; fix --text_files")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"text file {path!r} is not UTF-8; convert it or drop it") from None
    if not text:
        raise ValueError(f"text file {path!r} is empty; drop it from --text_files")
    return text


def _heldout_texts(workdir: str) -> dict[str, list[str]]:
    """{heldout/source: document texts} of the run's held-out split (--heldout)."""
    import dataclasses

    from gopher import inference
    from gopher.data.pipeline import heldout_documents

    model_cfg, _, data_cfg, _ = inference.read_config(workdir)
    if _DATA_PATHS.value is not None:
        if data_cfg.source != "files":
            raise ValueError(
                f"--data_paths: the run's data source is {data_cfg.source!r}, not files; "
                "drop --data_paths"
            )
        data_cfg = dataclasses.replace(data_cfg, paths=tuple(_DATA_PATHS.value))
    elif data_cfg.source == "files":
        for path in data_cfg.paths:
            if "://" not in path and not os.path.exists(path):
                raise ValueError(
                    f"the run's data path {path!r} (config.json data.paths) does not exist; "
                    "pass --data_paths=PATH[,PATH...] with where its data is now"
                )
    docs = heldout_documents(model_cfg, data_cfg, workdir)
    if data_cfg.source in ("stdlib", "files"):  # the embedded corpus stores its split
        from gopher import workdir as workdir_lib
        from gopher.data.pipeline import check_heldout

        recorded = workdir_lib.read_record(workdir) or {}
        ours = [d for ds in docs.values() for d in ds]
        check_heldout(ours, recorded.get(workdir_lib.HELDOUT_SHA256), data_cfg.paths)
    cut = slice(_HELDOUT_DOCS.value)
    return {f"heldout/{s}": [d.text for d in ds[cut]] for s, ds in docs.items() if ds}


class _StepFile:
    """WORKDIR/eval/step_<N>.json, rewritten after each task: this run's results over
    those of earlier runs for other tasks at that step."""

    def __init__(self, workdir: str, step: int):
        from gopher import paths

        self.path = paths.resolve(paths.join(workdir, "eval", f"step_{step}.json"))
        try:
            self.earlier = json.loads(self.path.read_text())["tasks"] if self.path.exists() else {}
            if not isinstance(self.earlier, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            say(f"warning: {self.path} is unreadable; it is rewritten with this run's results")
            self.earlier = {}

    def write(self, record: dict) -> None:
        from gopher import paths

        record = dict(record, tasks={**self.earlier, **record["tasks"]})
        paths.write_atomic(str(self.path), (json.dumps(record, indent=1) + "\n").encode())


def _result_key(name: str, task) -> str:
    """A task's key in the results: its own name, a file task's name (the file's stem)."""
    return task.name if name.startswith("file:") else name


def _check_result_names(loaded: dict) -> None:
    """Two tasks under one result key would overwrite each other's result: refuse."""
    seen: dict[str, str] = {}
    for name, task in loaded.items():
        key = _result_key(name, task)
        if key in seen:
            raise ValueError(
                f"--tasks gives two tasks named {key!r} ({seen[key]} and {name}); their results "
                "would overwrite each other: rename one file"
            )
        seen[key] = name


def evaluate() -> tuple[dict, dict, str]:
    """(results by task, the record for --out, the step file it is saved in)."""
    from gopher.evals import tasks

    # Tasks, files and held-out text first: bad input fails before the model restores.
    names = tasks.parse_task_spec(_TASKS.value) if _TASKS.value else []
    loaded = {name: tasks.load_task(name, _CACHE_DIR.value, _LIMIT.value) for name in names}
    _check_result_names(loaded)
    texts = {f"text/{p}": read_text_file(p) for p in _TEXT_FILES.value}
    t0 = time.perf_counter()
    sources = _heldout_texts(_WORKDIR.value) if _HELDOUT.value else {}
    import jax

    from gopher import background_errors, inference
    from gopher.evals import harness
    from gopher.evals.scoring import Scorer

    if not _VERBOSE.value:
        background_errors.quiet()  # a damaged step: one warning, not Orbax's 70 lines
    if jax.process_count() > 1:
        raise ValueError("evaluate runs in one process; start it on one host only")
    t_load = time.perf_counter()
    model = inference.load(_WORKDIR.value, step=_STEP.value)
    say(f"loaded step {model.step} of {_WORKDIR.value} in {time.perf_counter() - t_load:.1f} s")
    scorer = Scorer(
        model, batch_size=_BATCH_SIZE.value, max_len=_MAX_LEN.value, log=_throttled(say, 10.0)
    )
    step_file = _StepFile(_WORKDIR.value, model.step)
    results: dict = {}

    def record() -> dict:
        timings = dict(vars(scorer.timings), total_s=time.perf_counter() - t0)
        return {"step": model.step, "workdir": _WORKDIR.value, "tasks": results, "timings": timings}

    for name, task in loaded.items():
        say(f"{name}: {len(task.items)} items ({task.split})")
        key = _result_key(name, task)
        results[key] = harness.evaluate_task(scorer, task)
        # How it was made: the step file keeps earlier runs' results beside this one's.
        results[key].update(
            limit=_LIMIT.value, max_len=scorer.max_len, batch_size=_BATCH_SIZE.value
        )
        _say_done(key, results[key])
        step_file.write(record())
    for name, group in {**sources, **{k: [v] for k, v in texts.items()}}.items():
        say(f"{name}: {len(group)} documents")
        results[name] = harness.evaluate_text(scorer, group)
        results[name]["batch_size"] = _BATCH_SIZE.value
        if name.startswith("heldout/"):
            # How this bpb was made, so it is not mistaken for the in-training figure or
            # the sweep's (other windows, other documents): None = every document.
            results[name].update(split="heldout", heldout_docs=_HELDOUT_DOCS.value)
        else:
            results[name]["split"] = "file"
        _say_done(name, results[name])
        step_file.write(record())
    final = record()
    timings = final["timings"]
    say(
        f"compile {timings['compile_s']:.1f} s ({timings['compiles']} programs), run "
        f"{timings['run_s']:.1f} s ({timings['tokens']:,} positions), total "
        f"{timings['total_s']:.1f} s (with loading and tokenising)"
    )
    step_file.write(final)
    return results, final, str(step_file.path)


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
    cut = ""
    if r.get("truncated_requests") or r.get("skipped_items"):
        cut = (
            f"; {r.get('truncated_requests', 0)} requests truncated and "
            f"{r.get('skipped_items', 0)} items skipped to fit --max_len"
        )
    if r.get("extrapolated_requests"):
        cut += f"; {r['extrapolated_requests']} requests longer than the training seq_len"
    say(
        f"  {name}: {main} (chance {r['chance']:.4f}){cut}; compile {r['compile_s']:.1f} s, "
        f"run {r['run_s']:.1f} s"
    )


def main(argv):
    del argv
    if not _VERBOSE.value:
        logging.set_verbosity(logging.FATAL)  # Orbax's INFO and warnings on restore
    _check_flags()
    with common.user_errors(_VERBOSE.value):
        results, record, step_file = evaluate()
    if _JSON.value:
        print(json.dumps(results))
    else:
        from gopher.evals import harness

        print(harness.markdown_table(results), flush=True)
    if _OUT.value:
        from gopher import paths

        try:
            paths.write_atomic(_OUT.value, (json.dumps(record, indent=1) + "\n").encode())
        except OSError as e:
            common.fail(
                f"--out={_OUT.value} cannot be written ({e}); the results are in {step_file}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
