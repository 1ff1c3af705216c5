"""Reading a compiled program's HLO text: loops, collectives and matmul FLOPs.

`compiled.cost_analysis()` counts each computation once, so a loop body (the layer
stack's scan, the microbatch scan) counts once however many times it runs. These
helpers walk the call graph of `compiled.as_text()` from the entry computation,
multiply by each while loop's `known_trip_count`, and report:
- every collective (all-reduce, all-gather, reduce-scatter, all-to-all,
  collective-permute, and their async -start forms) with its result bytes per
  device, its replica groups and the loops around it;
- the FLOPs of every `dot` (2 x output elements x contracted size), trip counts
  included: matmuls are nearly all of a transformer's FLOPs.

The text format is XLA's HloModule::ToString; only the parts used here are parsed.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

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
    groups: str  # replica_groups as printed
    group_size: int  # devices in each group (0 if the format was not understood)


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
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


class Module:
    """The computations of one HLO module and the loops that call them."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.params: dict[str, dict[str, str]] = {}  # computation -> {param: shape}
        self.entry = ""
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
                        trip = _TRIP.search(ins.rest)
                        n = int(trip.group(1)) if trip else 1
                        stack.append((callee, runs * n, (*loops, ins.name)))
                    elif callee in self.computations:
                        stack.append((callee, runs, loops))

    def instructions(self):
        """(computation, instruction) for every instruction reachable from the entry."""
        for comp in self.runs:
            for ins in self.computations[comp]:
                yield comp, ins

    def while_trip_counts(self) -> dict[str, int]:
        """{while instruction: known trip count (1 when XLA does not know it)}."""
        out = {}
        for _, ins in self.instructions():
            if ins.op == "while":
                trip = _TRIP.search(ins.rest)
                out[ins.name] = int(trip.group(1)) if trip else 1
        return out

    def collectives(self) -> list[Collective]:
        out = []
        for comp, ins in self.instructions():
            base = ins.op.removesuffix("-start")
            if base in COLLECTIVES and not ins.op.endswith("-done"):
                groups = re.search(
                    r"replica_groups=(mesh\[[^\]]*\][^{]*\{[^}]*\}"
                    r"|\{\{[^=]*?\}\}|\{\}|\[[0-9,]+\]<=\[[^\]]*\][^,]*)",
                    ins.rest,
                )
                shape = ins.shape
                if ins.op.endswith("-start") and shape.startswith("("):
                    shape = _last_element(shape)  # (operands, result[, scratch]) of async forms
                out.append(
                    Collective(
                        base, shape_bytes(shape), shape, comp, self.loops[comp],
                        self.runs[comp], groups.group(1) if groups else "",
                        group_size(groups.group(1) if groups else ""),
                    )
                )  # fmt: skip
        return out

    def dot_flops(self) -> float:
        """2 x output elements x contracted size over every dot, loops' trips included."""
        total = 0.0
        for comp, ins in self.instructions():
            if ins.op != "dot":
                continue
            lhs = re.match(r"\s*(?:([a-z0-9]+\[[0-9,]*\]\S*) )?%([\w.\-]+)", ins.rest)
            lhs_shape = lhs.group(1) or self._shape_of(comp, lhs.group(2))
            contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.rest)
            dims = _dims(lhs_shape)
            k = (
                math.prod(dims[int(i)] for i in contracting.group(1).split(",") if i)
                if contracting
                else 1
            )
            total += 2.0 * math.prod(_dims(ins.shape)) * k * self.runs[comp]
        return total

    def _shape_of(self, comp: str, name: str) -> str:
        for ins in self.computations[comp]:
            if ins.name == name:
                return ins.shape
        return self.params[comp].get(name, "")


def group_size(groups: str) -> int:
    """Devices per replica group, from any of XLA's three printed forms:
    mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, {{0,1},{2,3}}, or [4,2]<=[8]."""
    if groups.startswith("mesh["):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", groups))
        names = re.findall(r"'([^']+)'", groups.rsplit("{", 1)[1]) if "{" in groups else []
        return math.prod(int(sizes[n]) for n in names if n in sizes)
    if groups.startswith("{{"):
        return len(groups[2:].split("}", 1)[0].split(","))
    m = re.match(r"\[([0-9,]+)\]<=", groups)
    return int(m.group(1).split(",")[-1]) if m else 0


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


def _last_element(tuple_shape: str) -> str:
    """The result of an async collective's (operand, result) tuple type."""
    arrays = re.findall(r"[a-z]+[0-9a-z]*\[[0-9,]*\](?:\{[^}]*\})?", tuple_shape)
    half = len(arrays) // 2 or 1
    return "(" + ", ".join(arrays[half:]) + ")" if len(arrays) > 1 else arrays[0]
