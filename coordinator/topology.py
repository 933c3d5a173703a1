"""Which GPUs of one node work best together: the interconnect model behind placement.

Theory of operation
-------------------
Each agent reads how every pair of its GPUs is connected (NVML, through
agent/devices/) and gossips it. `NodeTopology` holds that as one *link code*
per pair, on the levels `nvidia-smi topo -m` prints, plus each GPU's NUMA node
and nearby CPUs:

======  ===========  ======  ===================================================
code    nvidia-smi   weight  the path between the two GPUs
======  ===========  ======  ===================================================
16 + n  NV<n>        25·n    n NVLink links, direct (bridges) or through
                             NVSwitches (all-to-all: HGX H100 shows NV18 for
                             every pair)
5       PIX          16      one PCIe switch (NVML SINGLE; a dual-GPU board's
                             own switch: INTERNAL)
4       PXB          12      several PCIe switches, no host bridge (MULTIPLE)
3       PHB          8       one host bridge of a CPU (HOSTBRIDGE)
2       NODE         6       several host bridges of one NUMA node (NODE)
1       SYS          4       across NUMA nodes or sockets, over the CPUs'
                             interconnect (SYSTEM)
0       ?            1       unknown: NVML would not say; ranked below all else
======  ===========  ======  ===================================================

A higher code is a better link. The weights are rough per-direction GB/s: 25
per NVLink link of the third and fourth generation (NV12 on A100 = 300 GB/s,
NV18 on H100 = 450 GB/s), about 16 for peer traffic through one PCIe 4.0
switch, less at each step further up the tree, halved by the time it crosses
a host bridge. Only their order is relied on, and that any NVLink pair
outweighs any PCIe pair.

Ranking a set
-------------
Among sets of GPUs that best fit finds equal (placement.py), the set taken is
the one best by, in order:

1. its *weakest pair* (highest minimum pair weight): a collective over the
   set runs at the speed of its slowest hop, so one SYS pair in an otherwise
   NVLink set decides how fast it is;
2. its *score*: the sum of the weights of all its pairs;
3. *fragmentation*: the sum of the weights of the pairs left among the
   node's other free GPUs, highest first, so what stays free stays well
   connected for the next request (a two-GPU request on a box of two NVLink
   pairs takes a whole pair, and one GPU takes the GPU whose partner is gone);
4. the lowest GPU indices, so the same inputs always give the same set.

This is the Kubernetes device plugin's GetPreferredAllocation question
("which of these available devices, given these that must be included"),
answered by a pairwise score. An allocation reports its set's score (2), the
name of its weakest pair as `links`, the NUMA node all its GPUs share
(`numa_node`) and the union of their nearby CPUs (`cpu_list`).

Search cost
-----------
`best_set` tries every combination while there are at most
MAX_EXHAUSTIVE_SETS (8 GPUs choose 4 is 70); beyond that (16-GPU nodes) it
grows one set greedily from each candidate GPU, adding at each step the GPU
that keeps the best weakest pair and sum, and ranks those. Answers are
memoized per topology (at most MEMO_LIMIT of them): a planning pass asks the
same question for every request of one shape.

The gossip form
---------------
Agents before PXB and NODE were told apart gossip four PCIe codes (0 ?, 1 SYS,
2 PHB or NODE, 3 PIX or PXB) and reject any other. So `to_wire` keeps those
*legacy codes* in its second list, where every version reads them, and appends
a sixth: the positions (in that list) of the pairs one level further than
their legacy code says, PXB rather than PIX or NODE rather than PHB. Older
agents read the first five lists and see PIX and PHB, as before; a
topology from an older agent has no sixth list and reads the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

from coordinator.model import AllocationTopology

UNKNOWN = 0
SYS = 1
NODE = 2
PHB = 3
PXB = 4
PIX = 5
NVLINK_BASE = 16  # NVLink with n links is NVLINK_BASE + n

MAX_EXHAUSTIVE_SETS = 256
MEMO_LIMIT = 1024

_PCIE_WEIGHTS = {UNKNOWN: 1, SYS: 4, NODE: 6, PHB: 8, PXB: 12, PIX: 16}
_PCIE_NAMES = {UNKNOWN: "?", SYS: "SYS", NODE: "NODE", PHB: "PHB", PXB: "PXB", PIX: "PIX"}
# nvidia-smi topo -m's words -> link codes.
_SMI_WORDS = {name: code for code, name in _PCIE_NAMES.items() if code != UNKNOWN}
# The gossip form's legacy codes (see The gossip form): a code <-> (legacy code, refined?).
_LEGACY = {UNKNOWN: 0, SYS: 1, NODE: 2, PHB: 2, PXB: 3, PIX: 3}
_FROM_LEGACY = {0: UNKNOWN, 1: SYS, 2: PHB, 3: PIX}
_REFINED = {PHB: NODE, PIX: PXB}
_NV_WORD = re.compile(r"NV(\d+)")
_CPULIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")

# Rank of a candidate set: (weakest pair, score, fragmentation); higher is better.
_Rank = tuple[int, int, int]


def nvlink(links: int) -> int:
    """The link code of a pair joined by `links` NVLink links (≥ 1)."""
    if links < 1:
        raise ValueError(f"an NVLink pair has at least one link, got {links}")
    return NVLINK_BASE + links


def is_nvlink(code: int) -> bool:
    return code > NVLINK_BASE


def link_weight(code: int) -> int:
    """A link code's weight (the module's table)."""
    if is_nvlink(code):
        return 25 * (code - NVLINK_BASE)
    return _PCIE_WEIGHTS[code]


def link_name(code: int) -> str:
    """A link code as nvidia-smi spells it: "NV18", "PIX", "PXB", "PHB", "NODE", "SYS" (or "?")."""
    if is_nvlink(code):
        return f"NV{code - NVLINK_BASE}"
    return _PCIE_NAMES[code]


def _from_legacy(code: object) -> int:
    """The link code of a gossiped legacy code (see The gossip form). Raises ValueError for another value."""
    if not isinstance(code, int) or isinstance(code, bool) or not (code in _FROM_LEGACY or is_nvlink(code)):
        raise ValueError(f"{code!r} is not a gossiped link code")
    return code if is_nvlink(code) else _FROM_LEGACY[code]


def _valid_code(code: object) -> int:
    if not isinstance(code, int) or isinstance(code, bool) or not (code in _PCIE_WEIGHTS or is_nvlink(code)):
        raise ValueError(f"{code!r} is not a link code")
    return code


# ------------------------------------------------------------------ cpu lists


def parse_cpulist(text: str) -> frozenset[int]:
    """The CPUs of a Linux cpulist such as "0-31,64-95". Raises ValueError for anything else."""
    text = text.strip()
    if not _CPULIST.fullmatch(text):
        raise ValueError(f"{text!r} is not a cpulist such as 0-31,64-95")
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if high < low:
            raise ValueError(f"{text!r}: range {part} runs backwards")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """CPUs in Linux cpulist form, ranges joined: {0, 1, 2, 5} -> "0-2,5"; "" for none."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


# ------------------------------------------------------------------ one node


class NodeTopology:
    """One node's GPU interconnect: a link code per pair of its GPUs, and where each GPU sits.

    `links` maps (a, b) with a < b to a link code; the GPUs are those named
    there and in `numa` / `cpus` (a pair not given is UNKNOWN). `numa` gives a
    GPU's NUMA node, `cpus` its nearby CPUs as a cpulist (either None or
    absent when unknown). Immutable, compared by value; it memoizes its
    answers (see Search cost). Raises ValueError for a bad pair or code.
    """

    __slots__ = ("indices", "_codes", "_numa", "_cpus", "_weights", "_memo", "_key")

    def __init__(
        self,
        links: Mapping[tuple[int, int], int],
        numa: Mapping[int, int | None] | None = None,
        cpus: Mapping[int, str | None] | None = None,
    ) -> None:
        codes: dict[tuple[int, int], int] = {}
        for (a, b), code in links.items():
            if not 0 <= a < b:
                raise ValueError(f"a GPU pair is (a, b) with 0 <= a < b, got ({a}, {b})")
            codes[(a, b)] = _valid_code(code)
        named = {i for pair in codes for i in pair} | set(numa or {}) | set(cpus or {})
        self.indices: tuple[int, ...] = tuple(sorted(named))
        self._codes = codes
        self._numa = {i: n for i, n in (numa or {}).items() if n is not None}
        self._cpus: dict[int, frozenset[int]] = {}
        for i, text in (cpus or {}).items():
            if text:
                self._cpus[i] = parse_cpulist(text)
        self._weights = {pair: link_weight(code) for pair, code in codes.items()}
        self._memo: dict[tuple[Any, ...], tuple[int, ...]] = {}
        self._key = (
            tuple(sorted(codes.items())),
            tuple(sorted(self._numa.items())),
            tuple(sorted((i, format_cpulist(c)) for i, c in self._cpus.items())),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeTopology) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"NodeTopology({self.matrix()!r})"

    # ---------------------------------------------------------------- reading it

    def code(self, a: int, b: int) -> int:
        """The link code between GPUs `a` and `b` (UNKNOWN when not known)."""
        return self._codes.get((a, b) if a < b else (b, a), UNKNOWN)

    def weight(self, a: int, b: int) -> int:
        return self._weights.get((a, b) if a < b else (b, a), _PCIE_WEIGHTS[UNKNOWN])

    def numa_node(self, index: int) -> int | None:
        return self._numa.get(index)

    def cpu_list(self, index: int) -> str | None:
        cpus = self._cpus.get(index)
        return None if cpus is None else format_cpulist(cpus)

    def matrix(self) -> str:
        """The pairs as `nvidia-smi topo -m` prints them (GPU rows, no legend), for logs and errors."""
        names = [f"GPU{i}" for i in self.indices]
        rows = ["\t" + "\t".join([*names, "CPU Affinity", "NUMA Affinity"])]
        for a in self.indices:
            cells = ["X" if a == b else link_name(self.code(a, b)) for b in self.indices]
            numa = self._numa.get(a)
            rows.append("\t".join([f"GPU{a}", *cells, self.cpu_list(a) or "N/A", "N/A" if numa is None else str(numa)]))
        return "\n".join(rows)

    @classmethod
    def from_nvidia_smi(cls, text: str) -> NodeTopology:
        """The topology `nvidia-smi topo -m` printed as `text`: its GPU rows and columns.

        The header names the devices (GPU<i>, and NICs, whose columns and rows
        are skipped), then "CPU Affinity", "NUMA Affinity" and, on newer
        drivers, "GPU NUMA ID". Each GPU row is `GPU<i>`, one cell per device
        (X on its own column; NV<n>, PIX, PXB, PHB, NODE or SYS towards a GPU),
        then its CPU and NUMA affinity (N/A: unknown). The legend is skipped.
        Raises ValueError for a GPU row it cannot read.
        """
        lines = [line.split() for line in text.strip().splitlines() if line.strip()]
        header = lines[0]
        devices = header[: header.index("CPU")] if "CPU" in header else header
        columns = [int(word[3:]) if re.fullmatch(r"GPU\d+", word) else None for word in devices]
        links: dict[tuple[int, int], int] = {}
        numa: dict[int, int | None] = {}
        cpus: dict[int, str | None] = {}
        for words in lines[1:]:
            if not re.fullmatch(r"GPU\d+", words[0]):
                continue  # a NIC's row, or the legend
            row = int(words[0][3:])
            cells, rest = words[1 : 1 + len(columns)], words[1 + len(columns) :]
            if len(cells) != len(columns):
                raise ValueError(f"row {words[0]} has {len(cells)} cells for {len(columns)} devices")
            for column, cell in zip(columns, cells):
                if column is None:
                    continue  # towards a NIC
                if column == row:
                    if cell != "X":
                        raise ValueError(f"row {words[0]}: expected X on the diagonal, got {cell}")
                    continue
                nv = _NV_WORD.fullmatch(cell)
                if nv is not None:
                    code = nvlink(int(nv[1]))
                elif cell in _SMI_WORDS:
                    code = _SMI_WORDS[cell]
                else:
                    raise ValueError(f"row {words[0]}: unknown link {cell!r}")
                pair = (min(row, column), max(row, column))
                if links.setdefault(pair, code) != code:
                    raise ValueError(f"GPU{pair[0]} and GPU{pair[1]} disagree about their link")
            if rest:
                cpus[row] = None if rest[0] == "N/A" else rest[0]
            if len(rest) > 1:
                numa[row] = None if rest[1] == "N/A" else int(rest[1])
        return cls(links, numa, cpus)

    # ---------------------------------------------------------------- the wire (gossip)

    def to_wire(self) -> list[Any]:
        """A compact form for gossip: [GPU indices, legacy codes of their pairs (upper triangle, row
        by row), NUMA node per GPU, distinct cpulists, each GPU's position in them, the positions of
        the refined pairs]; null where unknown (see The gossip form).

        Eight GPUs take under 100 bytes in msgpack.
        """
        indices = list(self.indices)
        pair_codes = [self.code(a, b) for i, a in enumerate(indices) for b in indices[i + 1 :]]
        codes = [code if is_nvlink(code) else _LEGACY[code] for code in pair_codes]
        refined = [at for at, code in enumerate(pair_codes) if code in (PXB, NODE)]
        cpulists: list[str] = []
        refs: list[int | None] = []
        for i in indices:
            text = self.cpu_list(i)
            if text is None:
                refs.append(None)
                continue
            if text not in cpulists:
                cpulists.append(text)
            refs.append(cpulists.index(text))
        return [indices, codes, [self._numa.get(i) for i in indices], cpulists, refs, refined]

    @classmethod
    def from_wire(cls, wire: object) -> NodeTopology:
        """The topology `to_wire` encoded. Raises ValueError for anything else."""
        if not isinstance(wire, list) or len(wire) < 5 or not all(isinstance(part, list) for part in wire[:5]):
            raise ValueError("a topology is a list of five lists")
        indices, codes, numa, cpulists, refs = wire[:5]
        n = len(indices)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise ValueError("topology GPU indices must be whole numbers")
        if sorted(set(indices)) != indices:
            raise ValueError("topology GPU indices must be sorted and distinct")
        if len(codes) != n * (n - 1) // 2 or len(numa) != n or len(refs) != n:
            raise ValueError(f"a topology of {n} GPUs needs {n * (n - 1) // 2} links and {n} NUMA and CPU entries")
        if not all(isinstance(text, str) for text in cpulists):
            raise ValueError("topology cpulists must be strings")
        pairs = [(a, b) for i, a in enumerate(indices) for b in indices[i + 1 :]]
        links = {pair: _from_legacy(code) for pair, code in zip(pairs, codes)}
        refined = wire[5] if len(wire) > 5 else []
        if not isinstance(refined, list):
            raise ValueError("a topology's refined pairs are a list")
        for at in refined:
            if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at < len(pairs):
                raise ValueError(f"refined pair #{at!r} is not in the topology")
            a, b = pairs[at]
            if links[(a, b)] not in _REFINED:
                raise ValueError(f"GPU{a} and GPU{b}: {link_name(links[(a, b)])} has no finer level")
            links[(a, b)] = _REFINED[links[(a, b)]]
        numa_nodes: dict[int, int | None] = {}
        cpus: dict[int, str | None] = {}
        for i, node, ref in zip(indices, numa, refs):
            if node is not None and (not isinstance(node, int) or isinstance(node, bool)):
                raise ValueError(f"GPU {i}: a NUMA node is a whole number")
            if ref is not None and (not isinstance(ref, int) or isinstance(ref, bool) or not 0 <= ref < len(cpulists)):
                raise ValueError(f"GPU {i}: cpulist #{ref} is not in the table")
            numa_nodes[i] = node
            cpus[i] = None if ref is None else cpulists[ref]
        return cls(links, numa_nodes, cpus)

    # ---------------------------------------------------------------- sets

    def score(self, gpus: Sequence[int]) -> int:
        """The sum of the weights of every pair of `gpus` (0 for fewer than two)."""
        return sum(self.weight(a, b) for i, a in enumerate(gpus) for b in gpus[i + 1 :])

    def describe(self, gpus: Sequence[int]) -> AllocationTopology:
        """What an allocation of `gpus` reports (see Ranking a set)."""
        pairs = [(a, b) for i, a in enumerate(gpus) for b in gpus[i + 1 :]]
        weakest = min(pairs, key=lambda p: (self.weight(*p), self.code(*p)), default=None)
        numa = {self._numa.get(i) for i in gpus}
        cpus = [self._cpus.get(i) for i in gpus]
        known_cpus = [c for c in cpus if c is not None]
        return AllocationTopology(
            score=self.score(gpus),
            links=None if weakest is None else link_name(self.code(*weakest)),
            numa_node=numa.pop() if len(numa) == 1 else None,
            cpu_list=format_cpulist(set().union(*known_cpus)) if known_cpus and len(known_cpus) == len(cpus) else None,
        )

    def best_set(self, forced: Sequence[int], ties: Sequence[int], need: int, free: Sequence[int]) -> tuple[int, ...]:
        """The `need` GPUs to take, in index order: all of `forced`, and the best of `ties` for the rest.

        `free` are all of the node's free GPUs, forced and ties among them, for
        the fragmentation measure. Raises ValueError when `forced` and `ties`
        together hold fewer than `need` GPUs, `forced` more, or when `free`
        lacks one of them.
        """
        rest = need - len(forced)
        if rest < 0 or rest > len(ties):
            raise ValueError(f"cannot take {need} GPUs from {len(forced)} forced and {len(ties)} interchangeable")
        ordered_ties = tuple(sorted(ties))
        key = (tuple(sorted(forced)), ordered_ties, need, tuple(sorted(set(free))))
        if not set(forced).union(ordered_ties) <= set(key[3]):
            raise ValueError("the GPUs to choose from must be among the free ones")
        if rest == 0 or rest == len(ordered_ties):
            return tuple(sorted((*forced, *ordered_ties[:rest])))
        known = self._memo.get(key)
        if known is not None:
            return known
        if math.comb(len(ordered_ties), rest) <= MAX_EXHAUSTIVE_SETS:
            candidates: Iterable[tuple[int, ...]] = combinations(ordered_ties, rest)
        else:
            candidates = self._greedy(key[0], ordered_ties, rest)
        base = key[0]
        # Each free GPU's links to the other free GPUs, summed: what taking it removes
        # from the pairs left (pairs inside the set are removed twice, so added back once).
        rows = {a: sum(self.weight(a, b) for b in key[3] if b != a) for a in key[3]}
        left_total = sum(rows.values()) // 2
        best: tuple[_Rank, tuple[int, ...]] | None = None
        for extra in candidates:
            chosen = tuple(sorted((*base, *extra)))
            weights = [self.weight(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1 :]]
            inside = sum(weights)
            rank = (min(weights, default=0), inside, left_total - sum(rows[c] for c in chosen) + inside)
            # Strictly better only: candidates come lowest indices first, so ties keep those.
            if best is None or rank > best[0]:
                best = (rank, chosen)
        assert best is not None
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = best[1]
        return best[1]

    def _greedy(self, forced: tuple[int, ...], ties: tuple[int, ...], rest: int) -> list[tuple[int, ...]]:
        """One set per tie GPU, grown from it (and `forced`) a GPU at a time, each step the best for
        (weakest pair, sum) so far, lowest index on equal terms; duplicates dropped."""
        grown: dict[tuple[int, ...], None] = {}
        for seed in ties:
            members = [*forced, seed]
            taken = [seed]
            pairs = [self.weight(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
            weakest, total = min(pairs, default=math.inf), sum(pairs)
            while len(taken) < rest:
                best: tuple[float, int, int] | None = None
                for t in ties:
                    if t in taken:
                        continue
                    to_set = [self.weight(t, m) for m in members]
                    step = (min(weakest, min(to_set)), total + sum(to_set), -t)
                    if best is None or step > best:
                        best = step
                assert best is not None
                weakest, total = best[0], best[1]
                members.append(-best[2])
                taken.append(-best[2])
            grown[tuple(sorted(taken))] = None
        return list(grown)

    def all_nvlink(self, gpus: Sequence[int]) -> bool:
        """Whether every pair of `gpus` is joined by NVLink (false for fewer than two)."""
        return len(gpus) > 1 and all(is_nvlink(self.code(a, b)) for i, a in enumerate(gpus) for b in gpus[i + 1 :])

    def largest_nvlink_set(self, free: Iterable[int]) -> int:
        """The most of `free` GPUs that are NVLink-connected pair by pair (1 for a lone GPU, 0 for none).

        Memoized with best_set's answers: placement asks it each time a node's open GPUs change.
        """
        gpus = sorted(set(free))
        key = ("nvlink", tuple(gpus))
        known = self._memo.get(key)
        if known is not None:
            return known[0]
        neighbours = {a: {b for b in gpus if b != a and is_nvlink(self.code(a, b))} for a in gpus}
        best = 0

        # Bron–Kerbosch with a pivot: the node has at most a few dozen GPUs.
        def grow(size: int, candidates: set[int], excluded: set[int]) -> None:
            nonlocal best
            if not candidates and not excluded:
                best = max(best, size)
                return
            if size + len(candidates) <= best:
                return
            pivot = max(candidates | excluded, key=lambda v: len(neighbours[v] & candidates))
            for v in sorted(candidates - neighbours[pivot]):
                grow(size + 1, candidates & neighbours[v], excluded & neighbours[v])
                candidates = candidates - {v}
                excluded = excluded | {v}

        grow(0, set(gpus), set())
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = (best,)
        return best
