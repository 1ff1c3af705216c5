"""`python -m experiments.bench --peer=torch`: gopher and a PyTorch GPT-2 of the same shape,
side by side, each measurement in its own process.

Gopher runs as `experiments.bench` in single-run mode, then benchmarks/peers/gpt2_torch.py
(nanoGPT's GPT-2 on PyTorch, same layers, heads, d_model, vocab, seq and batch) eager, then
compiled, repeated `rounds` times, so each side's peak memory (ru_maxrss) is its own. Gopher
runs with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (as `make bench`: glibc's large allocations on
transparent huge pages); the peer runs each mode both with and without it and keeps the
faster, so a malloc setting cannot favour gopher (it slowed torch's step here). A round's peer figure is the faster of its eager and
compiled medians; `summarise` gives every round's gopher / peer ratio and their median (min,
max). The record (machine, each round's full records, the commands) is written to `out`, and
its one-line summary appended to the sittings file beside it (`sittings_path`).
The two models differ as the papers do: gopher has relative attention (a 13th d^2 per
layer, W_R) and RMSNorm; GPT-2 has absolute positions and LayerNorm; MFU counts each
model's own FLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.bench_machine import ROOT, git_revision, machine_record, timing_env

PEER_SCRIPTS = {"torch": os.path.join(ROOT, "benchmarks", "peers", "gpt2_torch.py")}


@dataclasses.dataclass(frozen=True)
class PeerOptions:
    """The side-by-side's settings, from experiments.bench's flags."""

    peer: str = "torch"
    named_shape: bool = True  # gopher's size given as --shape (else --preset)
    precision: str = "fp32"
    remat: str = "none"
    rounds: int = 3
    peer_python: str | None = None
    out: str = ""  # default benchmarks/bench_<shape>_peer.json
    peak_gflops: float = 0.0
    note: str = ""
    attention: str | None = None  # gopher's --attention, passed on (default: the preset's)
    unroll_layers: str | None = None  # gopher's --unroll_layers, passed on


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


def run_json(cmd: list[str], env: dict, what: str) -> dict:
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


def _commands(opts, name, model_cfg, train_cfg, steps, warmup, python):
    """The gopher and peer command lines for the same shape, and the environment both run in."""
    size = [f"--shape={name}"] if opts.named_shape else [f"--preset={name}"]
    size += [f"--seq_len={model_cfg.seq_len}", f"--batch={train_cfg.batch_size}"]
    timing = [f"--steps={steps}", f"--warmup={warmup}"]
    gopher = [sys.executable, "-m", "experiments.bench", *size, *timing]
    gopher += [f"--precision={opts.precision}", f"--remat={opts.remat}"]
    gopher += [f"--attention={opts.attention}"] if opts.attention else []
    gopher += [f"--unroll_layers={opts.unroll_layers}"] if opts.unroll_layers else []
    dims = {
        "layers": model_cfg.num_layers,
        "heads": model_cfg.num_heads,
        "d_model": model_cfg.d_model,
        "vocab": model_cfg.vocab_size,
        "seq": model_cfg.seq_len,
        "batch": train_cfg.batch_size,
    }
    peer = [python, PEER_SCRIPTS[opts.peer], *(f"--{k}={v}" for k, v in dims.items()), *timing]
    return gopher, timing_env(), peer, dims


PEER_ENVS = ("plain", "hugetlb")  # the peer's two malloc settings (bench_machine.timing_env)


def _peer_env(name: str) -> dict:
    return timing_env(hugetlb=name == "hugetlb")


def _one_round(label, gopher_cmd, env, peer_cmd, peak, tmp, say) -> dict:
    """gopher in `env`, then the peer eager, then compiled, each mode in both PEER_ENVS, the
    faster kept (the other under peer_MODE_other); each record gains its MFU at `peak`
    (None: the gopher run measures it)."""
    start = time.perf_counter()
    peak_flag = [f"--peak_gflops={peak / 1e9}"] if peak else []
    out = os.path.join(tmp, f"gopher_{label.replace('/', '_')}.jsonl")
    g = run_json([*gopher_cmd, *peak_flag, f"--out={out}"], env, "gopher")
    peak = peak or g["peak_flops"]
    say(
        f"round {label}: gopher {g['tokens_per_sec']:.1f} tokens/s, MFU {_pct(g['mfu'])}, "
        f"{g['peak_rss_gib']:.2f} GiB ({time.perf_counter() - start:.0f} s)"
    )
    r = {"gopher": g}
    for mode in ("eager", "compile"):
        recs = []
        for env_name in PEER_ENVS:
            start = time.perf_counter()
            what = f"torch {mode} ({env_name} malloc)"
            try:
                rec = run_json([*peer_cmd, f"--mode={mode}"], _peer_env(env_name), what)
            except ValueError as e:
                if mode == "eager":
                    raise
                # torch.compile needs a working C++ toolchain; eager alone still compares.
                say(f"round {label}: {what} failed: {e}")
                recs.append({"error": str(e), "env": env_name})
                continue
            rec["env"] = env_name
            rec["mfu"] = _mfu(rec["tokens_per_sec"], rec["flops_per_token"], peak)
            recs.append(rec)
            say(
                f"round {label}: {what} {rec['tokens_per_sec']:.1f} tokens/s, MFU "
                f"{_pct(rec['mfu'])}, {rec['peak_rss_gib']:.2f} GiB, first step "
                f"{rec['first_step_s']:.0f} s ({time.perf_counter() - start:.0f} s)"
            )
        recs.sort(key=lambda x: -x.get("tokens_per_sec", 0.0))  # the faster first
        r[f"peer_{mode}"], r[f"peer_{mode}_other"] = recs
    return r


def side_by_side(
    opts: PeerOptions, name: str, model_cfg, train_cfg, steps: int, warmup: int
) -> dict:
    """Alternates gopher, peer eager, peer compiled for --rounds; prints and saves."""
    if opts.rounds < 1:
        raise ValueError(f"--rounds={opts.rounds}; pass --rounds=1 or more")
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps={steps} --warmup={warmup}; with --peer both must be >= 1")
    if opts.precision != "fp32":
        raise ValueError(
            f"--precision={opts.precision} but the peer trains in fp32; use --precision=fp32"
        )
    if model_cfg.num_heads * model_cfg.key_size != model_cfg.d_model:
        raise ValueError(
            f"heads {model_cfg.num_heads} x key_size {model_cfg.key_size} != d_model "
            f"{model_cfg.d_model}: GPT-2 cannot take that shape; pick another preset"
        )
    python, torch_version = peer_python(opts.peer_python)
    out_path = opts.out or os.path.join(ROOT, "benchmarks", f"bench_{name}_peer.json")
    machine = machine_record(torch_version)
    gopher_cmd, env, peer_cmd, dims = _commands(
        opts, name, model_cfg, train_cfg, steps, warmup, python
    )

    def say(line):
        print(line, file=sys.stderr, flush=True)

    flags_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["flags"].items())
    say(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {flags_text}; "
        f"jax {machine['jax']}, torch {torch_version} ({python})"
    )
    peak = opts.peak_gflops * 1e9 or None
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.rounds):
            label = f"{i + 1}/{opts.rounds}"
            rounds.append(_one_round(label, gopher_cmd, env, peer_cmd, peak, tmp, say))
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
            f"{opts.precision}, each run in its own process, median of {steps} steps after "
            f"{warmup} warmup; rounds alternate gopher, torch eager, torch compiled, each torch "
            "mode with and without glibc's huge-page malloc, the faster kept"
        ),
        "command": "python -m experiments.bench " + shlex.join(sys.argv[1:]),
        "shape": name,
        **dims,
        "precision": opts.precision,
        "remat": opts.remat,
        "steps": steps,
        "warmup": warmup,
        "machine": machine,
        "peak_flops": peak,
        "peak_flops_source": rounds[0]["gopher"]["peak_flops_source"],
        "peer_python": python,
        "gopher_command": shlex.join(gopher_cmd),
        "gopher_glibc_tunables": env["GLIBC_TUNABLES"],
        "peer_command": shlex.join(peer_cmd),
        "peer_glibc_tunables": {name: _peer_env(name)["GLIBC_TUNABLES"] for name in PEER_ENVS},
        "summary": summary,
        "rounds": rounds,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git": git_revision(),
        "note": opts.note,
    }
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    history = sittings_path(out_path)
    with open(history, "a") as f:
        f.write(json.dumps(sitting_line(result)) + "\n")
    print(f"saved {out_path}; appended its summary to {history}")
    return result


def sittings_path(out_path: str) -> str:
    """Where every sitting's one-line summary accumulates, beside the (overwritten) record:
    bench_nanogpt_peer.json -> bench_nanogpt_peer_sittings.jsonl."""
    return os.path.splitext(out_path)[0] + "_sittings.jsonl"


def sitting_line(result: dict) -> dict:
    """One sitting of a side-by-side record, as a line: when, where, both sides and the ratio.
    The machine's speed moves between sittings and the sides do not move together, so the
    spread of these lines' ratios is the figure to trust, not one sitting's."""
    s, m = result["summary"], result["machine"]
    return {
        "time": result["time"],
        "git": result["git"],
        "shape": result["shape"],
        "cpu": m["cpu"],
        "cores": m["cores"],
        "jax": m["jax"],
        "torch": m.get("torch"),
        "gopher_tokens_per_sec": s["gopher_tokens_per_sec"],
        "peer_eager_tokens_per_sec": s["peer_eager_tokens_per_sec"],
        "peer_compile_tokens_per_sec": s["peer_compile_tokens_per_sec"],
        "peer_mode": s["peer_mode"],
        "ratio_median": s["ratio_median"],
        "ratio_min": s["ratio_min"],
        "ratio_max": s["ratio_max"],
        "rounds": len(s["rounds"]),
        "peak_rss_gib": s["peak_rss_gib"],
        "command": result["command"],
    }
