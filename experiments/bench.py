"""Train-step speed: tokens/s, MFU and compile time of the real, jitted train step.

    python -m experiments.bench --shape=nanogpt
    python -m experiments.bench --preset=tiny --precision=mixed --remat=full --steps=20
    python -m experiments.bench --shape=nanogpt --peer=torch        # ~10 min on 2 cores

Single run (no --peer): builds the train step with `gopher.train.make_train_functions`,
jits it with the state donated (as the host loop does), traces and compiles it ahead of
time (`compile_s`), warms up, then times `--steps` steps one by one (blocking on each):
`tokens_per_sec` is from the median step. On a shared machine `step_cpu_s` (CPU seconds
per step, all threads) is the steadier number. `mfu` is tokens/s x model FLOPs per token
(6 N + 12 L H Q T, gopher/metrics.py) over the peak FLOP/s of the one device the step runs
on (--peak_gflops, else the device table, else on CPU a measured fp32 matmul: the figure
the training loop uses). `peak_rss_gib` is the process's ru_maxrss. Prints one JSON line
and appends it, with the command line, to --out (`benchmarks/train_speed.jsonl`).

Side by side (--peer=torch): each measurement in its own process, so each side's peak
memory is its own: this module in single-run mode (with GLIBC_TUNABLES=glibc.malloc.hugetlb=1,
as `make bench`), then benchmarks/peers/gpt2_torch.py (nanoGPT's GPT-2 on PyTorch, same
layers, heads, d_model, vocab, seq and batch) eager, then compiled, repeated --rounds
times. The peer's figure in a round is the faster of its eager and compiled medians;
prints both sides' tokens/s, MFU and peak memory, the gopher / torch ratio of every round
and their median (min, max), and writes everything (machine, each round's full records,
the command) to --peer_out (`benchmarks/bench_<shape>_peer.json`, overwritten). The two
models differ as the papers do: gopher has relative attention (a 13th d^2 per layer,
W_R) and RMSNorm; GPT-2 has absolute positions and LayerNorm; MFU counts each model's own
FLOPs.

Shapes:
  nanogpt  the 44m row (8 layers, d_model 512, 16 heads, key 32, vocab 32000) at
           seq 512, batch 8: the shape nanoGPT on PyTorch and Haiku's example LM
           were timed at on the same machine (~620-650 and ~530 tokens/s on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_SCRIPTS = {"torch": os.path.join(ROOT, "benchmarks", "peers", "gpt2_torch.py")}
HUGETLB = "glibc.malloc.hugetlb=1"
# CPU features that decide which matmul kernels the two stacks can use.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

SHAPES = {
    # name: (preset, overrides, batch)
    "nanogpt": ("44m", {"seq_len": 512}, 8),
}

_SHAPE = flags.DEFINE_enum("shape", None, list(SHAPES), "A named benchmark shape.")
_PRESET = flags.DEFINE_string("preset", None, "Model preset (gopher/config.py PRESETS).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: the shape's).")
_BATCH = flags.DEFINE_integer("batch", None, "Sequences per step (default: the shape's).")
_PRECISION = flags.DEFINE_string("precision", "fp32", "fp32 | mixed | bf16 | bf16_sr | ...")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy name (gopher.model.REMAT_POLICIES).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (default 10; 5 with --peer).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_PEAK_GFLOPS = flags.DEFINE_float(
    "peak_gflops", 0.0, "Peak GFLOP/s for MFU (0: the device table, or on CPU a measured matmul)."
)
_OUT = flags.DEFINE_string("out", "benchmarks/train_speed.jsonl", "Where to append the result.")
_NOTE = flags.DEFINE_string("note", "", "Free text stored with the result (what was measured).")
_PEER = flags.DEFINE_enum("peer", None, list(PEER_SCRIPTS), "Also time this peer, side by side.")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", None, "Interpreter with torch for the peer (default: this one)."
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "With --peer: gopher, eager, compiled, this often.")
_PEER_OUT = flags.DEFINE_string(
    "peer_out", None, "With --peer: the JSON written (default benchmarks/bench_<shape>_peer.json)."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


# ----------------------------------------------------------------------- records


def parse_cpu_info(text: str) -> dict:
    """CPU model and the CPU_FLAGS present, from `lscpu` ("Model name:", "Flags:") or
    /proc/cpuinfo ("model name\\t:", "flags\\t\\t:") text."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    present = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or "unknown",
        "flags": {name: name in present for name in CPU_FLAGS},
    }


def machine_record(torch_version: str | None = None) -> dict:
    """This host: CPU model and flags of interest, cores, jax/jaxlib (and the peer's torch)."""
    import jax
    import jaxlib

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        text = ""
    if "Model name" not in text and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            text = f.read()
    return {
        **parse_cpu_info(text),
        "cores": os.cpu_count(),
        "host": platform.node(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": torch_version,
    }


def peak_rss_gib() -> float:
    """This process's peak resident memory (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def summarise(rounds: list[dict]) -> dict:
    """The side-by-side figures from each round's tokens/s.

    rounds: [{"gopher": tok/s, "peer_eager": tok/s, "peer_compile": tok/s or None}, ...].
    A round's peer figure is the faster of its eager and compiled runs; its ratio is
    gopher / that. The overall peer figure is the faster of the eager and the compiled
    medians over rounds.
    """
    if not rounds:
        raise ValueError("no rounds to summarise; pass --rounds=1 or more")
    per_round = []
    for r in rounds:
        modes = {m: r.get(f"peer_{m}") for m in ("eager", "compile")}
        modes = {m: v for m, v in modes.items() if v}
        if not modes:
            raise ValueError(f"a round without a peer figure: {r}")
        mode = max(modes, key=modes.get)
        per_round.append(
            {
                "gopher": r["gopher"],
                "peer": modes[mode],
                "peer_mode": mode,
                "ratio": r["gopher"] / modes[mode],
            }
        )
    medians = {}
    for mode in ("eager", "compile"):
        values = [r[f"peer_{mode}"] for r in rounds if r.get(f"peer_{mode}")]
        medians[mode] = statistics.median(values) if values else None
    peer_mode = max((m for m in medians if medians[m]), key=medians.get)
    ratios = [r["ratio"] for r in per_round]
    return {
        "rounds": per_round,
        "gopher_tokens_per_sec": statistics.median(r["gopher"] for r in rounds),
        "peer_eager_tokens_per_sec": medians["eager"],
        "peer_compile_tokens_per_sec": medians["compile"],
        "peer_tokens_per_sec": medians[peer_mode],
        "peer_mode": peer_mode,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


# ----------------------------------------------------------------------- single run


def configs(shape=None, preset=None, seq_len=None, batch=None):
    """(name, ModelConfig, TrainConfig) of a named shape or a preset (default `tiny`)."""
    from gopher import config as config_lib

    if shape and preset:
        raise ValueError(f"--shape={shape} and --preset={preset} both given; pass one of them")
    if shape:
        name, (preset, overrides, default_batch) = shape, SHAPES[shape]
    else:
        name, preset, overrides, default_batch = preset or "tiny", preset or "tiny", {}, 8
    model_cfg = config_lib.get_preset(preset).replace(**overrides)
    if seq_len:
        model_cfg = model_cfg.replace(seq_len=seq_len)
    train_cfg = config_lib.TrainConfig(
        steps=1000, batch_size=batch or default_batch, warmup_steps=10
    )
    return name, model_cfg, train_cfg


def _git_revision() -> str:
    """HEAD's short hash, with '+dirty' when tracked files differ from it ('' outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD"], capture_output=True, cwd=ROOT
        ).returncode
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def peak_flops(peak_gflops: float = 0.0) -> tuple[float | None, str]:
    """Peak FLOP/s of the one device the bench's step runs on, and where it came from.

    The training loop's rule (gopher.loop._peak_flops) for a single device: the user's
    figure, else the device table, else on CPU the measured matmul peak of the host
    (whose cores the one CPU device uses). loop's version multiplies by the device
    count, which a one-device step must not."""
    import jax

    from gopher import metrics as metrics_lib

    if peak_gflops:
        return peak_gflops * 1e9, "--peak_gflops"
    device = jax.devices()[0]
    peak = metrics_lib.device_peak_flops(device)
    if peak is not None:
        return peak, device.device_kind
    if device.platform == "cpu":
        return metrics_lib.measure_cpu_peak_flops(), "measured fp32 matmul (jax)"
    return None, "unknown (pass --peak_gflops)"


def single_run(
    name, model_cfg, train_cfg, precision="fp32", remat="none", steps=10, warmup=2, peak_gflops=0.0
) -> dict:
    """Times the jitted train step; the record `experiments.bench` prints."""
    import jax
    import jax.numpy as jnp

    from gopher import engine as engine_lib
    from gopher import metrics as metrics_lib
    from gopher import train as train_lib

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} --warmup={warmup}; pass --steps>=1 and --warmup>=0")
    b, t = train_cfg.batch_size, model_cfg.seq_len
    fns = train_lib.make_train_functions(model_cfg, train_cfg, precision, remat)
    state = jax.jit(fns.init)(jax.random.key(train_cfg.seed))
    tokens = jax.random.randint(jax.random.key(1), (b, t + 1), 0, model_cfg.vocab_size, jnp.int32)

    step = jax.jit(fns.train_step, donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    compile_s = time.perf_counter() - start
    engine_lib.release_freed_host_memory()  # as the training loop does after compiling

    for _ in range(warmup):
        state, metrics = compiled(state, tokens)
    jax.block_until_ready(state)
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, tokens)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    cpu_per_step = (time.process_time() - cpu_start) / steps
    step_s = statistics.median(times)
    tokens_per_sec = b * t / step_s
    flops_token = metrics_lib.flops_per_token(model_cfg, t)
    peak, peak_source = peak_flops(peak_gflops)
    mfu = metrics_lib.mfu(tokens_per_sec, flops_token, peak)

    return {
        "shape": name,
        "preset": model_cfg.name,
        "layers": model_cfg.num_layers,
        "heads": model_cfg.num_heads,
        "key_size": model_cfg.key_size,
        "d_model": model_cfg.d_model,
        "vocab": model_cfg.vocab_size,
        "seq_len": t,
        "batch": b,
        "precision": precision,
        "remat": remat,
        "steps": steps,
        "warmup": warmup,
        "tokens_per_sec": round(tokens_per_sec, 1),
        "step_time_s": round(step_s, 4),
        "step_time_min_s": round(min(times), 4),
        # CPU seconds (all threads) per step: steadier than wall time on a shared machine.
        "step_cpu_s": round(cpu_per_step, 3),
        "compile_s": round(compile_s, 2),
        "loss": round(float(metrics["loss"]), 4),
        "flops_per_token": flops_token,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "mfu": round(mfu, 4) if mfu is not None else None,
        "peak_rss_gib": peak_rss_gib(),
        "jax": jax.__version__,
        "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "machine": machine_record(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git": _git_revision(),
    }


# ----------------------------------------------------------------------- side by side


def peer_python(flag: str | None) -> tuple[str, str]:
    """The interpreter that runs the peer and its torch version; one-line errors."""
    python = flag or sys.executable
    probe = [python, "-c", "import torch; print(torch.__version__)"]
    try:
        proc = subprocess.run(probe, capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise ValueError(
            f"--peer_python={python} cannot be run ({e.strerror}); pass the path of a Python with torch"
        ) from None
    if proc.returncode:
        if flag:
            raise ValueError(
                f"--peer_python={flag} cannot import torch; install torch==2.13.0 there "
                "or pass another interpreter"
            )
        raise ValueError(
            "torch is not installed here; pip install -e '.[bench]' "
            "or pass --peer_python=/path/to/python"
        )
    return python, proc.stdout.strip().splitlines()[-1]


def _run_json(cmd: list[str], env: dict, what: str) -> dict:
    """Runs a bench subprocess and returns the JSON record of its last stdout line."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        tail = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        raise ValueError(
            f"the {what} run failed (exit {proc.returncode}: {tail[-1] if tail else 'no output'}); "
            f"run it alone to see why: {shlex.join(cmd)}"
        )
    return json.loads(lines[-1])


def _pct(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def _mfu(tokens_per_sec: float, flops_token: float, peak: float | None) -> float | None:
    return round(tokens_per_sec * flops_token / peak, 4) if peak else None


def _commands(name, model_cfg, train_cfg, steps, warmup, python):
    """The gopher and peer command lines (and gopher's environment) for the same shape."""
    size = [f"--shape={name}"] if _SHAPE.value else [f"--preset={name}"]
    size += [f"--seq_len={model_cfg.seq_len}", f"--batch={train_cfg.batch_size}"]
    timing = [f"--steps={steps}", f"--warmup={warmup}"]
    gopher = [sys.executable, "-m", "experiments.bench", *size, *timing]
    gopher += [f"--precision={_PRECISION.value}", f"--remat={_REMAT.value}"]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if HUGETLB not in tunables:
        tunables = f"{tunables}:{HUGETLB}" if tunables else HUGETLB
    dims = {
        "layers": model_cfg.num_layers,
        "heads": model_cfg.num_heads,
        "d_model": model_cfg.d_model,
        "vocab": model_cfg.vocab_size,
        "seq": model_cfg.seq_len,
        "batch": train_cfg.batch_size,
    }
    peer = [python, PEER_SCRIPTS[_PEER.value], *(f"--{k}={v}" for k, v in dims.items()), *timing]
    return gopher, dict(os.environ, GLIBC_TUNABLES=tunables), peer, dims


def _one_round(label, gopher_cmd, gopher_env, peer_cmd, peak, tmp, say) -> dict:
    """gopher, then the peer eager, then compiled; each record gains its MFU at `peak`
    (None: the gopher run measures it)."""
    start = time.perf_counter()
    peak_flag = [f"--peak_gflops={peak / 1e9}"] if peak else []
    out = os.path.join(tmp, f"gopher_{label.replace('/', '_')}.jsonl")
    g = _run_json([*gopher_cmd, *peak_flag, f"--out={out}"], gopher_env, "gopher")
    peak = peak or g["peak_flops"]
    say(
        f"round {label}: gopher {g['tokens_per_sec']:.1f} tokens/s, MFU {_pct(g['mfu'])}, "
        f"{g['peak_rss_gib']:.2f} GiB ({time.perf_counter() - start:.0f} s)"
    )
    r = {"gopher": g}
    for mode in ("eager", "compile"):
        start = time.perf_counter()
        try:
            rec = _run_json([*peer_cmd, f"--mode={mode}"], dict(os.environ), f"torch {mode}")
        except ValueError as e:
            if mode == "eager":
                raise
            # torch.compile needs a working C++ toolchain; eager alone still compares.
            r[f"peer_{mode}"] = {"error": str(e)}
            say(f"round {label}: torch {mode} failed: {e}")
            continue
        rec["mfu"] = _mfu(rec["tokens_per_sec"], rec["flops_per_token"], peak)
        r[f"peer_{mode}"] = rec
        say(
            f"round {label}: torch {mode} {rec['tokens_per_sec']:.1f} tokens/s, MFU "
            f"{_pct(rec['mfu'])}, {rec['peak_rss_gib']:.2f} GiB, first step "
            f"{rec['first_step_s']:.0f} s ({time.perf_counter() - start:.0f} s)"
        )
    return r


def side_by_side(name: str, model_cfg, train_cfg, steps: int, warmup: int) -> dict:
    """Alternates gopher, peer eager, peer compiled for --rounds; prints and saves."""
    if _ROUNDS.value < 1:
        raise ValueError(f"--rounds={_ROUNDS.value}; pass --rounds=1 or more")
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps={steps} --warmup={warmup}; with --peer both must be >= 1")
    if _PRECISION.value != "fp32":
        raise ValueError(
            f"--precision={_PRECISION.value} but the peer trains in fp32; use --precision=fp32"
        )
    if model_cfg.num_heads * model_cfg.key_size != model_cfg.d_model:
        raise ValueError(
            f"heads {model_cfg.num_heads} x key_size {model_cfg.key_size} != d_model "
            f"{model_cfg.d_model}: GPT-2 cannot take that shape; pick another preset"
        )
    python, torch_version = peer_python(_PEER_PYTHON.value)
    out_path = _PEER_OUT.value or os.path.join(ROOT, "benchmarks", f"bench_{name}_peer.json")
    machine = machine_record(torch_version)
    gopher_cmd, gopher_env, peer_cmd, dims = _commands(
        name, model_cfg, train_cfg, steps, warmup, python
    )

    def say(line):
        print(line, file=sys.stderr, flush=True)

    flags_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["flags"].items())
    say(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {flags_text}; "
        f"jax {machine['jax']}, torch {torch_version} ({python})"
    )
    peak = _PEAK_GFLOPS.value * 1e9 or None
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(_ROUNDS.value):
            label = f"{i + 1}/{_ROUNDS.value}"
            rounds.append(_one_round(label, gopher_cmd, gopher_env, peer_cmd, peak, tmp, say))
            # The first gopher run measures the peak; later runs and the peer's MFU reuse it.
            peak = peak or rounds[0]["gopher"]["peak_flops"]
    modes = ("eager", "compile")
    summary = summarise(
        [
            {"gopher": r["gopher"]["tokens_per_sec"]}
            | {f"peer_{m}": r[f"peer_{m}"].get("tokens_per_sec") for m in modes}
            for r in rounds
        ]
    )
    memory = {"gopher": max(r["gopher"]["peak_rss_gib"] for r in rounds)}
    for m in modes:
        values = [
            r[f"peer_{m}"]["peak_rss_gib"] for r in rounds if "peak_rss_gib" in r[f"peer_{m}"]
        ]
        memory[f"peer_{m}"] = max(values, default=None)
    summary["peak_rss_gib"] = memory
    gopher_flops = rounds[0]["gopher"]["flops_per_token"]
    summary["gopher_mfu"] = _mfu(summary["gopher_tokens_per_sec"], gopher_flops, peak)
    peer_flops = rounds[0]["peer_eager"]["flops_per_token"]
    summary["peer_mfu"] = _mfu(summary["peer_tokens_per_sec"], peer_flops, peak)

    for i, s in enumerate(summary["rounds"]):
        print(
            f"round {i + 1}: gopher {s['gopher']:.1f}  torch {s['peer']:.1f} ({s['peer_mode']})"
            f"  gopher/torch {s['ratio']:.3f}"
        )
    eager, compiled = summary["peer_eager_tokens_per_sec"], summary["peer_compile_tokens_per_sec"]
    print(
        f"gopher {summary['gopher_tokens_per_sec']:.1f} tokens/s, MFU "
        f"{_pct(summary['gopher_mfu'])}, peak RSS {_gib(memory['gopher'])}"
    )
    print(
        f"torch  {summary['peer_tokens_per_sec']:.1f} tokens/s ({summary['peer_mode']}; eager "
        f"{eager:.1f}, compiled {'n/a' if compiled is None else f'{compiled:.1f}'}), MFU "
        f"{_pct(summary['peer_mfu'])}, peak RSS eager {_gib(memory['peer_eager'])}, "
        f"compiled {_gib(memory['peer_compile'])}"
    )
    print(
        f"gopher/torch: median {summary['ratio_median']:.3f} (min {summary['ratio_min']:.3f}, "
        f"max {summary['ratio_max']:.3f}) over {len(rounds)} round(s); medians of rounds"
    )
    result = {
        "what": (
            f"train-step tokens/s, gopher ({model_cfg.name}: relative attention, RMSNorm) vs "
            f"nanoGPT's GPT-2 on PyTorch at the same layers/heads/d_model/vocab/seq/batch, "
            f"{_PRECISION.value}, each run in its own process, median of {steps} steps after "
            f"{warmup} warmup; rounds alternate gopher, torch eager, torch compiled"
        ),
        "command": "python -m experiments.bench " + shlex.join(sys.argv[1:]),
        "shape": name,
        **dims,
        "precision": _PRECISION.value,
        "remat": _REMAT.value,
        "steps": steps,
        "warmup": warmup,
        "machine": machine,
        "peak_flops": peak,
        "peak_flops_source": rounds[0]["gopher"]["peak_flops_source"],
        "peer_python": python,
        "gopher_command": shlex.join(gopher_cmd),
        "gopher_glibc_tunables": gopher_env["GLIBC_TUNABLES"],
        "peer_command": shlex.join(peer_cmd),
        "peer_glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "summary": summary,
        "rounds": rounds,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git": _git_revision(),
        "note": _NOTE.value,
    }
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    print(f"saved {out_path}")
    return result


def main(argv):
    del argv
    steps, warmup = _STEPS.value, _WARMUP.value
    with common.user_errors(_VERBOSE.value):
        name, model_cfg, train_cfg = configs(
            _SHAPE.value, _PRESET.value, _SEQ_LEN.value, _BATCH.value
        )
        if _PEER.value:
            side_by_side(name, model_cfg, train_cfg, 5 if steps is None else steps, warmup)
            return 0
        steps = 10 if steps is None else steps
        result = single_run(
            name,
            model_cfg,
            train_cfg,
            _PRECISION.value,
            _REMAT.value,
            steps,
            warmup,
            _PEAK_GFLOPS.value,
        )
    result["note"] = _NOTE.value
    print(json.dumps(result))
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        command = "python -m experiments.bench " + shlex.join(sys.argv[1:])
        with open(_OUT.value, "a") as f:
            f.write(json.dumps({**result, "command": command}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
