"""Sample text from a trained run: `python -m experiments.sample --workdir=DIR --prompt=TEXT`.

Loads the run's newest checkpoint (or --step) with gopher.inference.load, encodes the
prompt after an EOS (a document start, as in training) and streams the completion to
stdout as it is decoded (key/value-cached decoding, gopher/sample.py). Each of
--num_samples samples is drawn with seed --seed + i; the same seed gives the same text.

  python -m experiments.sample --workdir=runs/demo --prompt="The history of" \\
      --max_new_tokens=200 --temperature=0.8 --top_p=0.95 --stop=$'\\n\\n'

Exit status: 0 done; 2 bad input (one line naming the value and the fix; --verbose for
the traceback).
"""

from __future__ import annotations

import math
import sys
import time

from absl import app, flags, logging

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_PROMPT = flags.DEFINE_string("prompt", "", "The text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this file.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: the most likely tokens up to p (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the first sample.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Always take the most likely token.")
_STOP = flags.DEFINE_multi_string("stop", [], "End a sample at this text (repeatable).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def _check_flags() -> str:
    """Checks the flags before jax loads; returns the prompt text."""
    if not _WORKDIR.value:
        common.fail("--workdir is required; pass the --workdir of a training run")
    if _MAX_NEW.value < 1:
        common.fail(f"--max_new_tokens={_MAX_NEW.value}; pass a whole number >= 1")
    if not math.isfinite(_TEMPERATURE.value) or _TEMPERATURE.value < 0:
        common.fail(
            f"--temperature={_TEMPERATURE.value}; pass a finite number >= 0 (0 means greedy)"
        )
    if _TOP_K.value < 0:
        common.fail(f"--top_k={_TOP_K.value}; pass >= 0 (0 keeps every token)")
    if not math.isfinite(_TOP_P.value) or not 0 < _TOP_P.value <= 1:
        common.fail(f"--top_p={_TOP_P.value}; pass a probability in (0, 1] (1 keeps all)")
    if _NUM_SAMPLES.value < 1:
        common.fail(f"--num_samples={_NUM_SAMPLES.value}; pass a whole number >= 1")
    # Sample i draws with seed --seed + i: every one must be a 64-bit seed, checked here
    # rather than after the first samples have been printed.
    last = _SEED.value + _NUM_SAMPLES.value - 1
    if _SEED.value < -(2**63) or last >= 2**63:
        most = 2**63 - _NUM_SAMPLES.value
        common.fail(
            f"--seed={_SEED.value} with --num_samples={_NUM_SAMPLES.value} draws seeds "
            f"{_SEED.value} ... {last}, outside [-2**63, 2**63); pass a --seed in "
            f"[-2**63, {most}]"
        )
    if any(not s for s in _STOP.value):
        common.fail("--stop is empty; pass the text that ends a sample, or drop the flag")
    if _PROMPT_FILE.value is None:
        return _PROMPT.value
    if _PROMPT.value:
        common.fail("both --prompt and --prompt_file given; pass one of them")
    try:
        with open(_PROMPT_FILE.value, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        common.fail(
            f"--prompt_file={_PROMPT_FILE.value} is not UTF-8 text ({e}); convert it to UTF-8 "
            "(e.g. iconv -t UTF-8)"
        )
    except OSError as e:
        common.fail(f"--prompt_file={_PROMPT_FILE.value} cannot be read ({e}); fix the path")


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}; pass the prompt as --prompt=TEXT")
    prompt = _check_flags()
    if not _VERBOSE.value:
        logging.set_verbosity(logging.FATAL)  # Orbax logs every restore at INFO
    with common.user_errors(_VERBOSE.value):
        # late: flag errors print before jax loads
        from gopher import background_errors, inference, sample, sample_checks

        if not _VERBOSE.value:
            background_errors.quiet()  # a damaged step: one warning line
        model = inference.load(_WORKDIR.value, step=_STEP.value)
        # The longest prompt row (after the EOS), padded as generate pads it.
        prompt_len = len(model.tokenizer.encode(prompt)) + 1
        prompt_len = -(-prompt_len // sample.PROMPT_MULTIPLE) * sample.PROMPT_MULTIPLE
        sample_checks.check_memory(
            model, model.batch_multiple, prompt_len, _MAX_NEW.value, name="--max_new_tokens"
        )
        print(
            f"[{_WORKDIR.value} step {model.step}: {model.model_cfg.name}, "
            f"{model.mesh.devices.size} devices]",
            file=sys.stderr,
        )

        def stream(row: int, text: str):
            del row
            sys.stdout.write(text)
            sys.stdout.flush()

        for i in range(_NUM_SAMPLES.value):
            if _NUM_SAMPLES.value > 1:
                print(f"--- sample {i + 1} (seed {_SEED.value + i}) ---", flush=True)
            sys.stdout.write(prompt)
            start = time.perf_counter()
            result = _generate(
                sample,
                model,
                [prompt],
                _MAX_NEW.value,
                temperature=_TEMPERATURE.value,
                top_k=_TOP_K.value,
                top_p=_TOP_P.value,
                seed=_SEED.value + i,
                greedy=_GREEDY.value,
                stop=_STOP.value,
                stream=stream,
            )
            seconds = time.perf_counter() - start
            print(flush=True)
            n = len(result.tokens[0])
            print(
                f"[{n} tokens, ended by {result.finish[0]}, {seconds:.1f} s incl. compile]",
                file=sys.stderr,
                flush=True,
            )
    return 0


def _generate(sample, *args, **kwargs):
    """sample.generate_with_details; running out of memory is one line, naming the flag."""
    try:
        return sample.generate_with_details(*args, **kwargs)
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e) or _VERBOSE.value:
            raise
        first = str(e).strip().splitlines()[0][:200]
        common.fail(
            f"out of memory decoding --max_new_tokens={_MAX_NEW.value} ({first}); "
            "lower --max_new_tokens or shorten the prompt"
        )


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
