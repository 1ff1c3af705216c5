"""Where a profiled step's time went: the kernels of a `jax.profiler` trace, summed by name.

    python -m experiments.trace_summary DIR [--top=25]

DIR is a `jax.profiler.trace(DIR, create_perfetto_trace=True)` folder (experiments.bench
--profile=DIR writes one); the newest `perfetto_trace.json.gz` under it is read. On a GPU
or TPU the device's own timeline is summed ("/device:..." processes: one event per kernel
launch); on a CPU, where XLA's thunks run on the host, the threads of XLA's CPU client are.
Prints the busy time, each kernel name's total, share and call count (largest first), and
the same totals grouped into families: matmuls (gemm, cutlass, cublas, cuBLAS nvjet_sm90, dot), Triton
kernels (the Pallas attention on GPU), fusions, collectives, copies, and the rest.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys

FAMILIES = (  # (family, pattern on the lowercased kernel name), first match wins
    ("collective", r"nccl|all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|collective"),
    ("matmul", r"gemm|cutlass|cublas|\bdot|xmma|sm90_|wgmma|matmul|convolution"),
    ("triton (pallas)", r"triton|_kernel\b|pallas"),
    ("copy / transpose", r"copy|transpose|memcpy|memset|dynamic.update.slice"),
    ("fusion", r"fusion"),
)
# Events that hold others on the same line or are bookkeeping (XLA CPU's executor, its pools,
# control flow): counting them would count their kernels twice.
WRAPPERS = r"ThunkExecutor|SlinkyThreadPool|ThreadpoolListener|end:|while|conditional|call\b"


def trace_file(path: str) -> str:
    """The newest perfetto_trace.json.gz at or under `path`."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(
            f"no perfetto_trace.json.gz under {path!r}; profile with "
            "jax.profiler.trace(dir, create_perfetto_trace=True) (experiments.bench --profile=DIR)"
        )
    return max(found, key=os.path.getmtime)


def family(name: str) -> str:
    lowered = name.lower()
    for label, pattern in FAMILIES:
        if re.search(pattern, lowered):
            return label
    return "other"


def summarize(path: str, top: int = 25) -> dict:
    """Kernel time by name of the trace at `path`: {"source", "busy_ms", "kernels": [...],
    "families": {...}}. Durations are microseconds in the trace, milliseconds here."""
    with gzip.open(trace_file(path), "rt") as f:
        events = json.load(f)["traceEvents"]
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if device_pids:  # GPU / TPU: kernels on the device's streams (else its XLA Ops line)
        lines = {k: v for k, v in threads.items() if k[0] in device_pids}
        chosen = {k for k, v in lines.items() if "stream" in v.lower()} or {
            k for k, v in lines.items() if v == "XLA Ops"
        }
        chosen = chosen or set(lines)
    else:  # XLA CPU: the thunks run on the host threads of the PjRt client
        chosen = {k for k, v in threads.items() if "XLA" in v}
    source = ", ".join(
        sorted(
            {
                f"{processes.get(k[0], k[0])} / {re.sub(r'/-?[0-9]+$', '', threads[k])}"
                for k in chosen
            }
        )
    )
    totals, calls = collections.Counter(), collections.Counter()
    for e in events:
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "X" and key in chosen and not re.match(WRAPPERS, e["name"]):
            totals[e["name"]] += e.get("dur", 0.0) / 1e3
            calls[e["name"]] += 1
    busy = sum(totals.values())
    families = collections.Counter()
    for name, ms in totals.items():
        families[family(name)] += ms
    return {
        "source": source,
        "busy_ms": busy,
        "kernels": [
            {"name": name, "ms": ms, "share": ms / busy if busy else 0.0, "calls": calls[name]}
            for name, ms in totals.most_common(top)
        ],
        "families": {
            label: {"ms": ms, "share": ms / busy if busy else 0.0}
            for label, ms in families.most_common()
        },
    }


def format_summary(summary: dict) -> str:
    lines = [f"busy {summary['busy_ms']:.2f} ms on {summary['source']}"]
    for label, f in summary["families"].items():
        lines.append(f"  {label:<18} {f['ms']:10.2f} ms {100 * f['share']:5.1f}%")
    lines.append("  kernels:")
    for k in summary["kernels"]:
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        lines.append(f"  {k['ms']:10.2f} ms {100 * k['share']:5.1f}% x{k['calls']:<5d} {name}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--top=")]
    top = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--top=")), 25)
    if len(args) != 1:
        print("usage: python -m experiments.trace_summary DIR [--top=25]", file=sys.stderr)
        return 2
    try:
        print(format_summary(summarize(args[0], top)))
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
