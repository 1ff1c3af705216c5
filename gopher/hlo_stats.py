"""What a step's HLO says it costs: collective bytes per device and matmul FLOPs.

`collective_bytes(compiled.as_text(), slice_of)` walks the HLO module from its ENTRY
computation, multiplying by loop trip counts, and sums per device the bytes that a
ring algorithm sends over the links for every all-reduce, all-gather, reduce-scatter,
all-to-all and collective-permute (and their async "-start" forms):

  all-reduce        2 (n-1)/n * S   (S: the result's bytes; n: the group size)
  all-gather          (n-1)/n * S   (S: the gathered result)
  reduce-scatter      (n-1)   * S   (S: the scattered result, 1/n of the input)
  all-to-all          (n-1)/n * S
  collective-permute          S

A collective whose replica groups (or source-target pairs) join devices of different
slices goes over the data-centre network ("dcn"), every other one over the chips'
interconnect ("ici"). Device ids in the HLO are logical ids, the positions in the mesh's
flattened device array; `slice_of[i]` is the slice of logical id i.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2}
_DTYPE_BYTES |= {"s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\b(?:calls|body|branch_computations|true_computation|false_computation)=")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as `bf16[4,256]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """'(f32[], bf16[2]) all-reduce(...)' -> ('(f32[], bf16[2])', 'all-reduce(...)')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, op = rest.partition(" ")
    return shape, op


def replica_groups(attrs: str, num_devices: int) -> np.ndarray:
    """[groups, group size] logical device ids from an instruction's replica_groups:
    explicit `{{0,1},{2,3}}`, iota `[2,2]<=[4]` / `[2,2]<=[2,2]T(1,0)`, or
    `mesh['a'=2,'b'=2] {'a'}`; empty (`{}`) or absent means one group of all devices."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1)
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names = [a for a, _ in axes]
        grouped = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        ids = np.arange(math.prod(int(n) for _, n in axes)).reshape([int(n) for _, n in axes])
        rest = [i for i in range(len(names)) if i not in grouped]
        size = math.prod(ids.shape[i] for i in grouped)
        return ids.transpose(rest + grouped).reshape(-1, size)
    m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", attrs)
    if m:
        groups = [
            [int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))
        ]
        if groups and all(len(g) == len(groups[0]) for g in groups):
            return np.asarray(groups)
    return np.arange(num_devices).reshape(1, -1)


def _crosses(ids: np.ndarray, slice_of: np.ndarray) -> bool:
    slices = slice_of[ids]
    return bool((slices != slices[..., :1]).any())


def instruction_bytes(kind: str, shape: str, attrs: str, slice_of: np.ndarray) -> tuple[str, float]:
    """("ici" or "dcn", bytes one device sends) for one collective instruction."""
    n_dev = len(slice_of)
    if kind == "collective-permute":
        pairs = np.asarray(re.findall(r"\{(\d+),(\d+)\}", attrs), int).reshape(-1, 2)
        link = "dcn" if len(pairs) and _crosses(pairs % n_dev, slice_of) else "ici"
        start = shape.startswith("(")  # the async start's (input, output, context) tuple
        return link, float(_largest_array(shape) if start else shape_bytes(shape))
    groups = replica_groups(attrs, n_dev)
    n = groups.shape[1]
    link = "dcn" if _crosses(groups % n_dev, slice_of) else "ici"
    s = _largest_array(shape) if kind == "all-gather" and shape.startswith("(") else None
    s = float(shape_bytes(shape) if s is None else s)
    factor = {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1.0}.get(kind, (n - 1) / n)
    return link, factor * s


def _largest_array(shape: str) -> int:
    """The largest array of a tuple shape (an async start's output beside its input)."""
    return max((shape_bytes(f"{t}[{d}]") for t, d in _ARRAY.findall(shape)), default=0)


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the ENTRY computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            comps[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the largest integer
    constant its condition compares against (the scan length), else 1."""
    m = re.search(r'known_trip_count[^0-9]*"?n"?\s*:\s*"?(\d+)', line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    consts = [
        int(c)
        for body_line in comps.get(cond.group(1) if cond else "", [])
        for c in re.findall(r"[su]32\[\]\S*\s+constant\((\d+)\)", body_line)
    ]
    return max(consts, default=1)


def collective_bytes(hlo: str, slice_of: Sequence[int]) -> dict[str, float]:
    """{"ici": bytes, "dcn": bytes, "<kind>": bytes, ...} one device sends per run of
    the program, loop bodies counted once per trip."""
    comps, entry = _computations(hlo)
    slices = np.asarray(slice_of)
    memo: dict[str, dict[str, float]] = {}

    def walk(name: str, stack: tuple[str, ...]) -> dict[str, float]:
        if name in memo:
            return memo[name]
        out: dict[str, float] = {}
        for line in comps.get(name, []):
            m = _INSTR.match(line)
            if not m:
                continue
            shape, rest = _split_shape(m.group(2))
            op = rest.split("(", 1)[0]
            kind = op.removesuffix("-start")
            fused = _fused_reduce_scatter(rest, op, comps)
            if fused is not None:  # TPU's all-reduce + dynamic-slice fused as one collective
                kind, rest = "reduce-scatter", fused
            if kind in KINDS:
                link, sent = instruction_bytes(kind, shape, rest, slices)
                for key in (link, kind):
                    out[key] = out.get(key, 0.0) + sent
            trips = _trip_count(rest, comps) if op == "while" else 1
            for called in _called(rest, op):
                if called in comps and called not in stack:
                    for key, value in walk(called, (*stack, called)).items():
                        out[key] = out.get(key, 0.0) + trips * value
        memo[name] = out
        return out

    result = walk(entry, (entry,))
    return {"ici": result.get("ici", 0.0), "dcn": result.get("dcn", 0.0), **result}


def _fused_reduce_scatter(rest: str, op: str, comps: dict[str, list[str]]) -> str | None:
    """The inner all-reduce's attributes when `rest` is a TPU "all-reduce-scatter" fusion
    (an all-reduce whose result is sliced at once: a reduce-scatter on the links)."""
    if op != "fusion":
        return None
    m = re.search(r"calls=%?(all-reduce-scatter[\w.\-]*)", rest)
    for line in comps.get(m.group(1), []) if m else []:
        if " all-reduce(" in line:
            return line
    return None


def _called(rest: str, op: str) -> list[str]:
    """Computations an instruction runs: fusion / call bodies, a loop's body, branches
    (reductions' `to_apply` scalar functions hold no collectives and are skipped)."""
    if op.removesuffix("-start") in KINDS or "calls=%all-reduce-scatter" in rest:
        return []
    names = []
    for m in _CALLS.finditer(rest):
        tail = rest[m.end() :]
        group = tail[1 : tail.find("}")] if tail.startswith("{") else tail.split(",", 1)[0]
        names += [n.strip().lstrip("%") for n in group.split(",")]
    return names


# ------------------------------------------------------------------ matmul FLOPs

_TENSOR = re.compile(r"tensor<([\dx]*)x?[a-z]+\d*>")


def _dims(tensor_type: str) -> list[int]:
    """'16x256x32xf32' (the inside of tensor<...>) -> [16, 256, 32]."""
    return [int(d) for d in tensor_type.split("x") if d.isdigit()]


def dot_flops(stablehlo: str) -> float:
    """2 x result elements x contracted size, summed over every stablehlo.dot_general of
    a lowered module (`jit(f).lower(...).as_text()`), functions counted per call and
    while bodies per trip (the `constant dense<N>` their condition compares against).

    The lowered module has global shapes, so this is the step's matmul FLOPs over all
    devices. Unlike compiled.cost_analysis(), which leaves out while-loop bodies (the
    layer stack), it grows with the layers."""
    funcs: dict[str, list[str]] = {}
    current = None
    for line in stablehlo.splitlines():
        m = re.match(r"\s*func\.func\s+(?:public|private)?\s*@([\w.\-]+)\(", line)
        if m:
            current = m.group(1)
            funcs[current] = []
        elif current is not None:
            funcs[current].append(line)
    memo: dict[str, float] = {}

    def total(name: str, stack: tuple[str, ...]) -> float:
        if name in memo:
            return memo[name]
        flops, loops, cond_trips = 0.0, [], None  # loops: [(indent, trips)]
        for line in funcs.get(name, []):
            indent = len(line) - len(line.lstrip())
            scale = math.prod(t for _, t in loops)
            if line.strip() == "cond {":
                cond_trips = 1
            elif cond_trips is not None and line.strip().startswith("} do {"):
                loops.append((indent, cond_trips))
                cond_trips = None
            elif cond_trips is not None:
                c = re.search(r"constant dense<(\d+)> : tensor<i(?:32|64)>", line)
                cond_trips = max(cond_trips, int(c.group(1))) if c else cond_trips
            elif loops and line.strip() == "}" and indent == loops[-1][0]:
                loops.pop()
            elif "stablehlo.dot_general" in line:
                flops += scale * _dot_general_flops(line)
            for callee in re.findall(r"\bcall @([\w.\-]+)\(", line):
                if callee not in stack:
                    flops += scale * total(callee, (*stack, callee))
        memo[name] = flops
        return flops

    return total("main", ("main",))


def _dot_general_flops(line: str) -> float:
    """2 x prod(result dims) x prod(lhs contracting dims) of one dot_general line."""
    types = _TENSOR.findall(line.rsplit(" : ", 1)[-1])
    contract = re.search(r"contracting_dims = \[([\d, ]*)\]", line)
    if len(types) < 3 or not contract:
        return 0.0
    lhs, result = _dims(types[0]), _dims(types[-1])
    k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i.strip())
    return 2.0 * math.prod(result) * k
