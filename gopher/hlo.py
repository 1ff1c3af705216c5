"""Reading a compiled program's HLO text: loops, collectives, link bytes and matmul FLOPs.

`compiled.cost_analysis()` counts each computation once, so a loop body (the layer
stack's scan, the microbatch scan) counts once however many times it runs. `Module`
walks the call graph of `compiled.as_text()` from the entry computation, multiplies by
each while loop's trip count (XLA's `known_trip_count`, else the largest integer
constant its condition compares against: the scan length), and reports:
- every collective (all-reduce, all-gather, reduce-scatter, all-to-all,
  collective-permute, their async -start forms, and TPU's "all-reduce-scatter" fusion,
  an all-reduce whose result is sliced at once, i.e. a reduce-scatter on the links)
  with its result bytes per device, its replica groups as device ids, the loops around
  it and the bytes a ring algorithm makes one device send per run:

    all-reduce        2 (n-1)/n * S   (S: the result's bytes; n: the group size)
    all-gather          (n-1)/n * S   (S: the gathered result)
    reduce-scatter      (n-1)   * S   (S: the scattered result, 1/n of the input)
    all-to-all          (n-1)/n * S
    collective-permute          S

- `link_bytes(slice_of)`: those bytes per step, trips included, split by link: a
  collective whose groups (or source-target pairs) join devices of different slices
  goes over the data-centre network ("dcn"), every other one over the chips'
  interconnect ("ici"). Device ids are logical: positions in the mesh's flattened
  device array; `slice_of[i]` is the slice of logical id i;
- the FLOPs of every `dot` (2 x output elements x contracted size), trips included, per
  device: matmuls are nearly all of a transformer's FLOPs, and the compiled program's
  own count includes any work XLA repeats on several devices (XLA CPU and GPU keep
  dots; XLA TPU turns them into convolutions, so there `lowered_dot_flops` counts the
  lowered StableHLO's global matmul FLOPs instead).

The text format is XLA's HloModule::ToString; only the parts used here are parsed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
FUSED_REDUCE_SCATTER = "all-reduce-scatter"  # TPU's fusion computations of that name

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) (\(.*\)) -> .* \{$")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result type as printed, e.g. "f32[8,128]{1,0}" or a tuple
    op: str
    rest: str  # operands and attributes


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # e.g. "all-gather" (an async "-start" form is reported by its base name)
    bytes: int  # of the result, per device
    shape: str
    computation: str
    loops: tuple[str, ...]  # the while loops around it, outermost first
    runs: int  # times it runs per step: the product of those loops' trip counts
    groups: tuple[tuple[int, ...], ...]  # device ids per group (a permute: its pairs)
    group_size: int  # devices in each group
    sent: float  # bytes one device sends per run (ring algorithm, module docstring)

    def link(self, slice_of: Sequence[int]) -> str:
        """ "dcn" if some group joins devices of different slices, else "ici"."""
        crosses = any(len({slice_of[i] for i in g}) > 1 for g in self.groups)
        return "dcn" if crosses else "ici"


def ring_sent(op: str, result_bytes: float, n: int) -> float:
    """Bytes one of `n` devices sends in a ring `op` whose result holds `result_bytes`:
    all-reduce 2(n-1)/n, reduce-scatter (n-1) (its result is one shard), the others
    (all-gather, all-to-all) (n-1)/n."""
    factor = {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1.0}
    return factor.get(op, (n - 1) / n) * result_bytes


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO type string; tuples sum their elements."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def array_dims(shape: str) -> list[list[int]]:
    """The dims of each array in an HLO type string (one list per tuple element)."""
    return [[int(d) for d in dims.split(",") if d] for _, dims in _ARRAY.findall(shape)]


def _dims(shape: str) -> list[int]:
    dims = array_dims(shape)
    return dims[0] if dims else []


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """XLA's iota device list `[dims]` or `[dims]T(perm)`, transposed, as an array."""
    ids = np.arange(math.prod(int(d) for d in dims.split(","))).reshape(
        [int(d) for d in dims.split(",")]
    )
    return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def replica_groups(attrs: str, devices: int) -> np.ndarray:
    """[groups, group size] device ids from an instruction's replica_groups: explicit
    `{{0,1},{2,3}}`, iota `[2,2]<=[4]` / `[2,2]<=[2,2]T(1,0)`, or
    `mesh['a'=2,'b'=2] {'a'}` (with `device_ids=([2,2]T(1,0))` when the mesh's devices
    are not in id order); empty (`{}`) or absent: one group of all `devices`."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        return _iota(m.group(2), m.group(3)).reshape(int(m.group(1).split(",")[0]), -1)
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]([^{]*)\{([^}]*)\}", attrs)
    if m:
        axes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        names = [a for a, _ in axes]
        order = re.search(r"device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)", m.group(2))
        ids = (
            _iota(order.group(1), order.group(2))
            if order
            else np.arange(math.prod(n for _, n in axes))
        )
        ids = ids.reshape([n for _, n in axes])
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
        others = [i for i in range(len(names)) if i not in grouped]
        size = math.prod(ids.shape[i] for i in grouped)
        return ids.transpose(others + grouped).reshape(-1, size)
    m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m[1])]
        if groups and all(len(g) == len(groups[0]) for g in groups):
            return np.asarray(groups)
    return np.arange(devices).reshape(1, -1)


class Module:
    """The computations of one HLO module and the loops that call them."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.params: dict[str, dict[str, str]] = {}  # computation -> {param: shape}
        self.entry = ""
        first = text.split("\n", 1)[0]
        counts = [re.search(rf"\b{k}=(\d+)", first) for k in ("num_partitions", "replica_count")]
        self.devices = math.prod(int(c.group(1)) for c in counts if c)
        current = None
        for line in text.splitlines():
            header = _HEADER.match(line)
            if header:
                current = header.group(2)
                self.computations[current] = []
                self.params[current] = dict(
                    re.findall(r"([\w.\-]+): ([^,()]+(?:\[[^\]]*\])?)", header.group(3))
                )
                if header.group(1):
                    self.entry = current
                continue
            m = _INSTR.match(line) if current else None
            if m:
                self.computations[current].append(
                    Instruction(m.group(2), m.group(3), m.group(4), m.group(5))
                )
        if not self.entry:
            raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text()")
        self._walk()

    def _walk(self) -> None:
        """Trip-count multipliers and enclosing loops of every reachable computation."""
        self.runs: dict[str, int] = {}
        self.loops: dict[str, tuple[str, ...]] = {}
        stack = [(self.entry, 1, ())]
        while stack:
            comp, runs, loops = stack.pop()
            if self.runs.get(comp, 0) >= runs:
                continue
            self.runs[comp], self.loops[comp] = runs, loops
            for ins in self.computations.get(comp, []):
                for attr, callee in _callees(ins):
                    if attr == "body":
                        stack.append((callee, runs * self.trip_count(ins), (*loops, ins.name)))
                    elif callee in self.computations:
                        stack.append((callee, runs, loops))

    def trip_count(self, loop: Instruction) -> int:
        """A while loop's trips: XLA's known_trip_count, else the largest integer
        constant in its condition (what the counter is compared against), else 1."""
        trip = _TRIP.search(loop.rest)
        if trip:
            return int(trip.group(1))
        cond = re.search(r"\bcondition=%?([\w.\-]+)", loop.rest)
        comps = [cond.group(1)] if cond else []
        comps += [
            c for name in comps for i in self.computations.get(name, []) for _, c in _callees(i)
        ]
        consts = [
            int(ins.rest.split(")", 1)[0])
            for name in comps
            for ins in self.computations.get(name, [])
            if ins.op == "constant" and re.match(r"[su](32|64)\[\]", ins.shape)
        ]
        return max(consts, default=1)

    def instructions(self):
        """(computation, instruction) for every instruction reachable from the entry."""
        for comp in self.runs:
            for ins in self.computations[comp]:
                yield comp, ins

    def while_trip_counts(self) -> dict[str, int]:
        """{while instruction: its trip count (see trip_count)}."""
        return {i.name: self.trip_count(i) for _, i in self.instructions() if i.op == "while"}

    def collectives(self) -> list[Collective]:
        """Every collective reachable from the entry, with the loops around it."""
        out = []
        for comp, ins in self.instructions():
            if comp.startswith(FUSED_REDUCE_SCATTER):
                continue  # counted at the fusion that calls it
            op, attrs, shape = ins.op.removesuffix("-start"), ins.rest, ins.shape
            fused = re.search(rf"\bcalls=%?({FUSED_REDUCE_SCATTER}[\w.\-]*)", attrs)
            if ins.op == "fusion" and fused:
                inner = [i for i in self.computations[fused.group(1)] if i.op == "all-reduce"]
                op, attrs = "reduce-scatter", inner[0].rest if inner else ""
            if op not in COLLECTIVES or ins.op.endswith("-done"):
                continue
            if ins.op.endswith("-start") and op != "all-reduce" and shape.startswith("("):
                shape = _async_result(op, shape)
            if op == "collective-permute":
                pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
                groups = re.findall(r"(\d+),(\d+)", pairs.group(1)) if pairs else []
                groups, n = [tuple(map(int, p)) for p in groups], 2
            else:
                groups = [tuple(int(i) for i in g) for g in replica_groups(attrs, self.devices)]
                n = len(groups[0])
            s = shape_bytes(shape)
            sent = s if op == "collective-permute" else ring_sent(op, s, n)
            out.append(
                Collective(
                    op, s, shape, comp, self.loops[comp], self.runs[comp], tuple(groups), n, sent
                )
            )
        return out

    def link_bytes(self, slice_of: Sequence[int]) -> dict[str, float]:
        """{"ici": bytes, "dcn": bytes, "<op>": bytes, ...} one device sends per step
        over each link (and per collective kind), loop bodies counted per trip."""
        out = {"ici": 0.0, "dcn": 0.0}
        for c in self.collectives():
            for key in (c.link(slice_of), c.op):
                out[key] = out.get(key, 0.0) + c.sent * c.runs
        slices = len(set(slice_of))
        for op, sent in self.megascale_transfers(slices):
            out["dcn"] += sent
            out[op] = out.get(op, 0.0) + sent
        return out

    def megascale_transfers(self, slices: int) -> list[tuple[str, float]]:
        """(kind, bytes one device sends per step) of each cross-slice transfer. A
        multi-slice TPU program is compiled per slice: its replica groups stay inside the
        slice and the data-centre-network collectives are host-transfer `send`s to the
        Megascale runtime (`_xla_megascale_transfer_type`), with the ring factor of
        their kind over `slices` participants."""
        out = []
        for comp, ins in self.instructions():
            kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.rest)
            if ins.op != "send" or not kind:
                continue
            op = kind.group(1).lower().replace("_", "-")
            s = shape_bytes(_ARRAY.search(ins.shape).group(0)) if _ARRAY.search(ins.shape) else 0
            out.append((op, ring_sent(op, s, max(slices, 1)) * self.runs[comp]))
        return out

    def dot_flops(self) -> float | None:
        """Per-device FLOPs of every dot (2 x output elements x contracted size), loops'
        trips included; None when the program has convolutions (XLA TPU writes batched
        matmuls as convolutions with the batch dims as padded windows, whose work the
        window sizes overstate): use `lowered_dot_flops` there."""
        total = 0.0
        for comp, ins in self.instructions():
            if ins.op == "convolution":
                return None
            if ins.op != "dot":
                continue
            lhs = re.match(r"\s*(?:([a-z0-9]+\[[0-9,]*\]\S*) )?%([\w.\-]+)", ins.rest)
            lhs_shape = lhs.group(1) or self._shape_of(comp, lhs.group(2))
            contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.rest)
            dims, axes = _dims(lhs_shape), contracting.group(1) if contracting else ""
            k = math.prod(dims[int(i)] for i in axes.split(",") if i)
            total += 2.0 * math.prod(_dims(ins.shape)) * k * self.runs[comp]
        return total

    def _shape_of(self, comp: str, name: str) -> str:
        for ins in self.computations[comp]:
            if ins.name == name:
                return ins.shape
        return self.params[comp].get(name, "")


def _callees(ins: Instruction) -> list[tuple[str, str]]:
    """(attribute, computation) pairs an instruction calls."""
    out = []
    for attr in ("calls", "to_apply", "condition", "body"):
        m = re.search(rf"\b{attr}=%?([\w.\-]+)", ins.rest)
        if m:
            out.append((attr, m.group(1)))
    m = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
    if m:
        out += [("branch", name) for name in re.findall(r"%?([\w.\-]+)", m.group(1))]
    return out


def _async_result(op: str, tuple_shape: str) -> str:
    """The result in an async start's tuple type: (operands, results) for gathers and
    all-to-all, (input, output, context scalars) for collective-permute."""
    arrays = re.findall(r"[a-z]+[0-9a-z]*\[[0-9,]*\](?:\{[^}]*\})?", tuple_shape)
    if op == "collective-permute":
        return arrays[1] if len(arrays) > 1 else arrays[0]
    half = len(arrays) // 2 or 1
    return "(" + ", ".join(arrays[half:]) + ")" if len(arrays) > 1 else arrays[0]


# ------------------------------------------------------------------ matmul FLOPs

_TENSOR = re.compile(r"tensor<([\dx]*)x?[a-z]+\d*>")


def _tensor_dims(tensor_type: str) -> list[int]:
    """'16x256x32xf32' (the inside of tensor<...>) -> [16, 256, 32]."""
    return [int(d) for d in tensor_type.split("x") if d.isdigit()]


def lowered_dot_flops(stablehlo: str) -> float:
    """2 x result elements x contracted size, summed over every stablehlo.dot_general of
    a lowered module (`jit(f).lower(...).as_text()`), functions counted per call and
    while bodies per trip (the `constant dense<N>` their condition compares against).

    The lowered module has global shapes, so this is the step's matmul FLOPs over all
    devices; except inside a shard_map (`sdy.manual_computation`), whose body has one
    device's shapes, so its count is multiplied by the sizes of its manual mesh axes.
    Unlike compiled.cost_analysis(), which leaves out while-loop bodies (the layer
    stack), it grows with the layers."""
    funcs: dict[str, list[str]] = {}
    meshes: dict[str, dict[str, int]] = {}  # sdy.mesh name -> {axis: size}
    current = None
    for line in stablehlo.splitlines():
        m = re.match(r"\s*func\.func\s+(?:public|private)?\s*@([\w.\-]+)\(", line)
        mesh = re.match(r"\s*sdy\.mesh @([\w.\-]+) = <\[(.*?)\]", line)
        if mesh:
            axes = re.findall(r'"(\w+)"=(\d+)', mesh.group(2))
            meshes[mesh.group(1)] = {a: int(n) for a, n in axes}
        elif m:
            current = m.group(1)
            funcs[current] = []
        elif current is not None:
            funcs[current].append(line)
    memo: dict[str, float] = {}

    def manual_devices(line: str) -> int:
        """The devices a shard_map region's body runs on: its manual axes' sizes."""
        mesh = re.search(r"<@([\w.\-]+),", line)
        sizes = meshes.get(mesh.group(1), {}) if mesh else {}
        axes = re.search(r"manual_axes=\{(.*?)\}", line)
        names = re.findall(r'"(\w+)"', axes.group(1)) if axes else []
        return math.prod(sizes.get(a, 1) for a in names)

    def total(name: str, stack: tuple[str, ...]) -> float:
        if name in memo:
            return memo[name]
        # regions: [(indent, factor)] of the enclosing while bodies (trips) and shard_map
        # bodies (devices), closed by a line at their opening indent starting with "}".
        flops, regions, cond_trips = 0.0, [], None
        for line in funcs.get(name, []):
            indent = len(line) - len(line.lstrip())
            scale = math.prod(f for _, f in regions)
            if line.strip() == "cond {":
                cond_trips = 1
            elif cond_trips is not None and line.strip().startswith("} do {"):
                regions.append((indent, cond_trips))
                cond_trips = None
            elif cond_trips is not None:
                c = re.search(r"constant dense<(\d+)> : tensor<i(?:32|64)>", line)
                cond_trips = max(cond_trips, int(c.group(1))) if c else cond_trips
            elif regions and line.lstrip().startswith("}") and indent == regions[-1][0]:
                regions.pop()
            elif "sdy.manual_computation(" in line and line.rstrip().endswith("{"):
                regions.append((indent, manual_devices(line)))
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
    lhs, result = _tensor_dims(types[0]), _tensor_dims(types[-1])
    k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i.strip())
    return 2.0 * math.prod(result) * k
