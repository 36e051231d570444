"""Placements and selection: graph analysis that finds where CBAM can go. Never mutates a graph.

A *site* is one node whose output is a channels-first feature map (N, C, *spatial). Which nodes
are candidates depends on the placement:

* ``conv``  — the end of each conv unit: a convolution plus the norm and the activation that
  directly follow it (conv -> bn -> relu gives the relu; conv -> bn gives the bn). Frozen convs
  (no parameter requires grad) and one-channel outputs (YOLO's DFL) are skipped. An opaque module
  (one that does not trace) whose last conv or channel norm defines its output counts as a conv.
* ``block`` — each residual merge ``a + b`` of two same-shaped feature maps; CBAM goes on the
  residual branch, before the merge. The shortcut is the operand that is an ancestor of the
  other (identity) or, when both are computed, the shorter path from their nearest common
  ancestor. A merge whose long path drops below the merge's spatial size (FPN, U-Net, HRNet
  fusions) is a top-down merge, not a residual block; global descriptors (1x1 maps of squeeze
  and excitation gates) do not count as a lower level. Nor are residual blocks: a running sum
  whose paths also read layers before the fork (ConvTasNet's skip sums), and an attention output
  plus a positional term (the short path is a matmul: YOLO11's ``attn.add``).
* ``stage`` — the output of each backbone stage, across the traced parts of the model in the
  order they run: the articulation nodes (every path from the input through the backbone passes
  through them) before the first feature map larger than one on its way from the input (an
  upsampling: a decoder, neck or head starts there), grouped by spatial size; a stage ends at the last one that is the output of
  the shallowest module (an untraced parent counts: ultralytics' C2f returns its ``cv2``), when
  the stretch before it holds at least two conv units or one residual block. The model's output
  and maps no learnable layer reads (logits, masks) are never stage ends, and the last stage
  stays in the module that holds the earlier ones (smp's encoder, not the FPN lateral conv or PAN's pooling).
* a module name, glob or regex (``"layer4.*.bn3"``, ``"re:layer[34]\\..*"``) or a class name
  (``"Bottleneck"``): the output of every matching module.

Only tensors whose channel axis is 1 are sites; ``cbam_insert.layout`` tracks the axis.
"""

from __future__ import annotations

import fnmatch
import heapq
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .attention import is_attention
from .layout import (
    _ACT_FUNCS,
    _ACT_METHODS,
    _ACT_MODULES,
    _CONV_FUNCS,
    _NORM_FUNCS,
    _NORM_MODULES,
    Analysis,
    _carries_tensor,
    _describe,
    _tensor_info,
    _upsamples,
)
from .modules import CBAM
from .recipe import Selection
from .trace import FROZEN_NORMS, Anchor, Unit, is_add

__all__ = ["PLACEMENTS", "Site", "cbam_module_name", "find_sites_in", "find_unit_sites", "select_sites"]

PLACEMENTS = ("conv", "block", "stage")


@dataclass(frozen=True)
class Site:
    """One place where a CBAM module can refine a feature map.

    ``name`` is the site's stable name (module path, or ``scope.op`` for a functional merge),
    ``kind`` one of ``conv``, ``block``, ``stage``, ``module``. ``used`` says whether the
    selection keeps it; ``reason`` says why not (or what it is when used). ``module_name`` is
    the qualified name the inserted CBAM gets. ``anchor`` (and ``operand_anchor`` for a block's
    branch) says what defines the site, so the splice finds it in every graph of its unit;
    ``output`` marks a site that is its unit's return value.
    """

    name: str
    kind: str
    channels: int
    shape: tuple[int, ...]
    used: bool
    reason: str
    unit: str = ""
    key: str = ""
    operand: str | None = None
    stage: int | None = None
    module_name: str = ""
    dtype: str = ""
    anchor: Anchor | None = None
    operand_anchor: Anchor | None = None
    output: bool = False

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "channels": self.channels or None,
            "shape": list(self.shape),
            "used": self.used,
            "reason": self.reason,
            "stage": self.stage,
            "module": self.module_name if self.used else None,
        }


# ----------------------------------------------------------------------------- placements


def _is_conv(a: Analysis, n: fx.Node) -> bool:
    """A convolution, or an opaque module (one that does not trace) whose output its last conv or
    channel norm defines (``MobileNetV2ConvLayer``: padding computed with ``int()``, conv, norm, act)."""
    mod = a.module_of(n)
    if mod is not None:
        if isinstance(mod, a.unit.leaf_types):
            return a.axis.get(n) == 1 and any(isinstance(m, nn.modules.conv._ConvNd) for m in mod.modules())
        return isinstance(mod, nn.modules.conv._ConvNd)
    return n.op == "call_function" and n.target in _CONV_FUNCS


def _is_norm(a: Analysis, n: fx.Node) -> bool:
    mod = a.module_of(n)
    if mod is not None:
        return isinstance(mod, _NORM_MODULES + FROZEN_NORMS)
    return n.op == "call_function" and n.target in _NORM_FUNCS


def _is_act(a: Analysis, n: fx.Node) -> bool:
    mod = a.module_of(n)
    if mod is not None:
        return isinstance(mod, _ACT_MODULES)
    if n.op == "call_function":
        return n.target in _ACT_FUNCS
    return n.op == "call_method" and n.target in _ACT_METHODS


def _sole_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def conv_units(a: Analysis) -> list[tuple[fx.Node, fx.Node]]:
    """(conv, unit end) pairs: conv, then the norm and activation that directly follow it."""
    units = []
    for n in a.nodes:
        if not _is_conv(a, n):
            continue
        end = n
        nxt = _sole_user(end)
        if nxt is not None and _is_norm(a, nxt) and nxt.args and nxt.args[0] is end:
            end = nxt
            nxt = _sole_user(end)
        if nxt is not None and _is_act(a, nxt) and nxt.args and nxt.args[0] is end:
            end = nxt
        units.append((n, end))
    return units


def _site(a: Analysis, kind: str, name_key: str, node: fx.Node, operand: fx.Node | None = None, reason: str = "") -> Site:
    target = operand if operand is not None else node
    info = _tensor_info(target)
    ok, why = a.feature_map(target)
    if ok and (a.is_cbam(target) or (operand is None and a.followed_by_cbam(target))):
        there = a.module_of(target) if a.is_cbam(target) else a.attention_at(target)
        what = "CBAM" if isinstance(there, CBAM) else f"{getattr(there, 'name', 'an')} attention"
        ok, why = False, f"already has {what} (allow_repatch=True / --repatch adds another)"
    shape = info.shape if info is not None else ()
    return Site(
        name=a.unit.full_name(name_key),
        kind=kind,
        channels=_channels(a, target, shape),
        shape=tuple(int(s) for s in shape),
        used=ok,
        reason=reason if ok else why,
        unit=a.unit.path,
        key=a.keys[node],
        operand=a.keys[operand] if operand is not None else None,
        dtype=str(info.dtype).replace("torch.", "") if info is not None else "",
        anchor=a.anchors.get(node),
        operand_anchor=a.anchors.get(operand) if operand is not None else None,
        output=operand is None and target is a.returned,
    )


def _conv_sites(a: Analysis) -> list[Site]:
    sites = []
    for conv, end in conv_units(a):
        chain = "+".join(_short(a, x) for x in _chain(conv, end))
        site = _site(a, "conv", a.keys[conv], end, reason=f"after {chain}")
        why = _not_learnable(a, conv)
        sites.append(replace(site, used=False, reason=why) if why and site.used else site)
    return sites


def _not_learnable(a: Analysis, conv: fx.Node) -> str:
    """Why a conv's output is no learnable feature map (YOLO's DFL: a fixed one-channel conv)."""
    mod = a.module_of(conv)
    if mod is None:
        return ""
    params = list(mod.parameters())
    if params and not any(p.requires_grad for p in params):
        return "a frozen conv (requires_grad=False): not a learnable feature map"
    if getattr(mod, "out_channels", 0) == 1:
        return "a one-channel conv output: nothing for channel attention to weigh"
    return ""


def _chain(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    out = [start]
    while out[-1] is not end:
        out.append(next(iter(out[-1].users)))
    return out


def _short(a: Analysis, n: fx.Node) -> str:
    mod = a.module_of(n)
    return type(mod).__name__ if mod is not None else _describe(n)


def _ancestry(a: Analysis, x: fx.Node, y: fx.Node) -> tuple[fx.Node | None, dict[fx.Node, int]]:
    """Nearest common ancestor of x and y, walking back in reverse topological order.

    Returns it and, for every node seen, which side reached it (bit 1: x, bit 2: y). The walk
    stops at the first node both sides reach, so its cost is the size of the block.
    """
    seen: dict[fx.Node, int] = {x: 1}
    seen[y] = seen.get(y, 0) | 2
    heap = [(-a.index[x], 0, x)]
    if y is not x:
        heap.append((-a.index[y], 1, y))
    heapq.heapify(heap)
    queued = {x, y}
    tie = 2
    while heap:
        _, _, n = heapq.heappop(heap)
        if seen[n] == 3:
            return n, seen
        for p in n.all_input_nodes:
            if p in a.const or not _carries_tensor(p):
                continue  # shape reads (x.shape, x.size()) are not dataflow
            seen[p] = seen.get(p, 0) | seen[n]
            if p not in queued:
                queued.add(p)
                heapq.heappush(heap, (-a.index[p], tie, p))
                tie += 1
    return None, seen


def _path_nodes(a: Analysis, fork: fx.Node, end: fx.Node, side: int, seen: dict[fx.Node, int]) -> tuple[int, list[fx.Node]]:
    """Longest path length (in nodes) from fork to end, and the nodes strictly between them."""
    members = sorted((n for n, s in seen.items() if s & side and a.index[fork] <= a.index[n] <= a.index[end]), key=a.index.get)
    length: dict[fx.Node, int] = {fork: 0}
    for n in members:
        if n is fork:
            continue
        preds = [length[p] for p in n.all_input_nodes if p in length]
        if preds:
            length[n] = max(preds) + 1
    inner = [n for n in members if n in length and n is not fork and n is not end]
    return length.get(end, 0), inner


def _block_sites(a: Analysis) -> list[Site]:
    sites = []
    for n in a.nodes:
        if not is_add(n):
            continue
        ops = [x for x in n.args[:2] if isinstance(x, fx.Node)]
        if len(ops) != 2 or any(x in a.const for x in ops):
            continue
        ia, ib = _tensor_info(ops[0]), _tensor_info(ops[1])
        if ia is None or ib is None or ia.shape != ib.shape:
            continue
        key = a.keys[n]
        ok, why = a.feature_map(n)
        if not ok:
            sites.append(_skip(a, "block", key, n, f"merge of {why}"))
            continue
        if _gated_merge(a, ops):
            sites.append(_skip(a, "block", key, n, "gated merge (z*a + (1 - z)*b with a sigmoid gate z, as in a GRU): not a residual block"))
            continue
        fork, seen = _ancestry(a, ops[0], ops[1])
        if fork is None:
            sites.append(_skip(a, "block", key, n, "the operands share no ancestor: not a residual block"))
            continue
        (la, pa), (lb, pb) = _path_nodes(a, fork, ops[0], 1, seen), _path_nodes(a, fork, ops[1], 2, seen)
        if la == lb:
            sites.append(_skip(a, "block", key, n, f"symmetric merge (both paths {la} ops long): no residual branch"))
            continue
        branch, path = (ops[0], pa) if la > lb else (ops[1], pb)
        short = ([ops[1]] + pb) if la > lb else ([ops[0]] + pa)
        if any(_is_matmul(m) for m in short):
            sites.append(_skip(a, "block", key, n, "attention output plus a positional term (the short path is a matmul): not a residual block"))
            continue
        if _mixes_earlier(a, fork, path + [branch] + short):
            sites.append(_skip(a, "block", key, n, "accumulating sum (a path also adds layers before the fork): not a residual block"))
            continue
        size = ia.shape[2:]
        for m in path + [fork, branch]:
            info = _tensor_info(m)
            if info is not None and len(info.shape) == len(ia.shape) and a.axis.get(m) == 1:
                small = info.shape[2:]
                # a global descriptor (SE/CBAM squeeze, all spatial dims 1) is a gate, not a level
                if any(s < t for s, t in zip(small, size)) and any(s > 1 for s in small):
                    break
                # ... unless the path upsamples it back: a top-down level that happens to be 1x1
                if m is not fork and small == size and _upsamples(a, m):
                    break
        else:
            weighted = any(any(True for _ in m.parameters()) for m in map(a.module_of, [x for x in short if x is not fork]) if m is not None)
            shortcut = "projection" if weighted else "identity"
            sites.append(_site(a, "block", key, n, operand=branch, reason=f"residual branch ({shortcut} shortcut)"))
            continue
        sites.append(_skip(a, "block", key, n, "top-down merge (the long path drops below the merge's resolution): not a residual block"))
    return sites


_MULS = {operator.mul, torch.mul}
_SIGMOIDS = {torch.sigmoid, F.sigmoid}
_SUBS = {operator.sub, torch.sub, torch.rsub}


def _gated_merge(a: Analysis, ops: Sequence[fx.Node]) -> bool:
    """Both operands are products, gated by one sigmoid: ``z * a + (1 - z) * b`` (a GRU's or a
    highway layer's interpolation, not a branch added to a shortcut)."""

    def is_mul(n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target in _MULS) or (n.op == "call_method" and n.target == "mul")

    def is_sigmoid(n: fx.Node) -> bool:
        return (
            (n.op == "call_function" and n.target in _SIGMOIDS)
            or (n.op == "call_method" and n.target == "sigmoid")
            or isinstance(a.module_of(n), nn.Sigmoid)
        )

    def gates(product: fx.Node) -> set[fx.Node]:
        out = set()
        for f in product.args:
            if not isinstance(f, fx.Node):
                continue
            if is_sigmoid(f):
                out.add(f)
            elif f.op == "call_function" and f.target in _SUBS:  # 1 - z
                out.update(g for g in f.args if isinstance(g, fx.Node) and is_sigmoid(g))
        return out

    return all(is_mul(x) for x in ops) and bool(gates(ops[0]) & gates(ops[1]))


def _mixes_earlier(a: Analysis, fork: fx.Node, members: Sequence[fx.Node]) -> bool:
    """Some node between the fork and the merge reads a tensor computed before the fork (a
    running skip sum, ConvTasNet style), other than through the fork itself."""
    inside = set(members) | {fork}
    reads = {p for m in members if m is not fork for p in m.all_input_nodes if p not in inside and p not in a.const and _carries_tensor(p)}
    if not reads:
        return False
    seen, todo = set(), [fork]
    while todo:
        for p in todo.pop().all_input_nodes:
            if p not in seen:
                seen.add(p)
                todo.append(p)
    return bool(reads & seen)


_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum, F.scaled_dot_product_attention}


def _is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _MATMULS) or (n.op == "call_method" and n.target in ("matmul", "bmm"))


def _skip(a: Analysis, kind: str, key: str, n: fx.Node, reason: str) -> Site:
    info = _tensor_info(n)
    shape = tuple(int(s) for s in info.shape) if info is not None else ()
    return Site(a.unit.full_name(key), kind, _channels(a, n, shape), shape, False, reason, a.unit.path, key)


def _channels(a: Analysis, n: fx.Node, shape: Sequence[int]) -> int:
    """dim 1 of a channels-first tensor; 0 (unknown) when dim 1 is not a channel axis."""
    return int(shape[1]) if len(shape) > 1 and a.axis.get(n) == 1 else 0


def _cut_vertices(a: Analysis, stop: int) -> list[fx.Node]:
    """Articulation nodes of the graph's first ``stop`` nodes: every path from the input through
    that part passes through them (reads by nodes beyond it, U-Net skips, do not count)."""
    # shape reads (x.shape[-2:] kept for a final resize, as in FCN) are not dataflow: they span no stage
    order = [n for n in a.nodes[:stop] if n not in a.const and n.op != "output" and _carries_tensor(n)]
    pos = {n: i for i, n in enumerate(order)}
    cuts, reach = [], -1
    for i, n in enumerate(order):
        if reach <= i and n.op != "placeholder":
            cuts.append(n)
        for u in n.users:
            if u in pos:
                reach = max(reach, pos[u])
    return cuts


def _learnable_after(a: Analysis) -> set[fx.Node]:
    """Nodes from which a module with parameters (not CBAM) is reached: a node without is a
    head's or the model's output (logits, a segmentation map, box offsets)."""
    found: set[fx.Node] = set()
    for n in reversed(a.nodes):
        for u in n.users:
            mod = a.module_of(u)
            if u in found or (mod is not None and not is_attention(mod) and any(True for _ in mod.parameters())):
                found.add(n)
                break
    return found


@dataclass
class _Candidate:
    unit: int
    node: fx.Node
    size: tuple[int, ...]
    convs: int
    merges: int
    depth: int  # of the outermost module whose output it is, in the whole model


def _stage_candidates(a: Analysis, ui: int, block_sites: Sequence[Site], smallest: tuple[int, ...] | None) -> tuple[list[_Candidate], tuple[int, ...] | None, bool]:
    """One unit's possible stage ends, the smallest resolution seen after it, and whether the
    backbone ended in it (a feature map larger than one before it: a decoder, neck or head)."""
    convs = [a.index[c] for c, _ in conv_units(a)]
    merges = [a.index[a.by_key[s.key]] for s in block_sites if s.used]
    stop, ended = len(a.nodes), False
    # low[n]: the smallest resolution on the way to n (n and its ancestors' feature maps; a part's
    # inputs start from the smallest seen in the parts before). A map larger than that comes from a
    # lower level: upsampling, so a decoder, neck or head. Graph order alone is not enough: a block
    # may compute its strided shortcut before its branch starts at the input's resolution.
    low: dict[fx.Node, tuple[int, ...]] = {}
    for n in a.nodes:
        ok, _ = a.feature_map(n)
        size = tuple(_tensor_info(n).shape[2:]) if ok else None  # type: ignore[union-attr]
        below = [low[p] for p in n.all_input_nodes if p in low]
        if n.op == "placeholder" and smallest is not None:
            below.append(smallest)
        rank = len(size) if size is not None else len(below[0]) if below else 0
        below = [b for b in below if len(b) == rank]
        floor = tuple(min(dims) for dims in zip(*below)) if below else None
        if size is not None and floor is not None and any(s > m for s, m in zip(size, floor)):
            stop, ended = a.index[n], True
            break
        here = size if floor is None else floor if size is None else tuple(min(s, m) for s, m in zip(size, floor))
        if here is not None:
            low[n] = here
        if size is not None:
            smallest = size if smallest is None or len(size) != len(smallest) else tuple(min(s, m) for s, m in zip(size, smallest))
    whole = a.unit.path == ""
    learnable = _learnable_after(a)
    last = a.scope_last_nodes()
    base = a.unit.path.count(".") + 1 if a.unit.path else 0
    outer = (a.unit.returned_by or a.unit.path).count(".")
    out, prev = [], -1
    for n in _cut_vertices(a, stop):
        ok, _ = a.feature_map(n)
        if not ok or (whole and (n is a.returned or n not in learnable)):
            continue
        idx = a.index[n]
        depth = outer if not whole and n is a.returned else base + _scope_depth(n, last)
        size = tuple(_tensor_info(n).shape[2:])  # type: ignore[union-attr]
        out.append(_Candidate(ui, n, size, sum(prev < i <= idx for i in convs), sum(prev < i <= idx for i in merges), depth))
        prev = idx
    return out, smallest, ended


def stage_ends(analyses: Sequence[Analysis], blocks: Sequence[Sequence[Site]]) -> list[list[fx.Node]]:
    """The output node of each backbone stage, per unit (see the module doc): the traced parts
    are taken in the order they run, as one model."""
    candidates: list[_Candidate] = []
    smallest = None
    for ui, a in enumerate(analyses):
        found, smallest, ended = _stage_candidates(a, ui, blocks[ui], smallest)
        candidates.extend(found)
        if ended:
            break
    groups: list[list[_Candidate]] = []
    for c in candidates:
        if groups and groups[-1][-1].size == c.size:
            groups[-1].append(c)
        else:
            groups.append([c])
    ends: list[list[fx.Node]] = [[] for _ in analyses]
    chosen: list[tuple[Analysis, fx.Node]] = []
    convs = merges = 0
    for g in groups:
        pool = g
        owners = {_outer(x, n) for x, n in chosen}
        if len(chosen) >= 2 and len(owners) == 1:
            # stay in the module that holds the earlier stages: smp's encoder, not the FPN lateral
            # conv at the same resolution nor the pyramid pooling of PAN's decoder below it
            pool = [c for c in g if _outer(analyses[c.unit], c.node) in owners]
            if not pool:
                break
        # the last one at this resolution that is the output of the shallowest module (so an
        # expand conv inside the next block does not count)
        best = min(c.depth for c in pool)
        pick = [c for c in pool if c.depth == best][-1]
        a, end = analyses[pick.unit], pick.node
        upto = next(i for i, c in enumerate(g) if c.node is end)
        convs += sum(c.convs for c in g[: upto + 1])
        merges += sum(c.merges for c in g[: upto + 1])
        rest = (sum(c.convs for c in g[upto + 1 :]), sum(c.merges for c in g[upto + 1 :]))
        if convs >= 2 or merges >= 1:
            ends[pick.unit].append(end)
            chosen.append((a, end))
            convs, merges = rest
        else:
            convs, merges = convs + rest[0], merges + rest[1]
    return ends


def _outer(a: Analysis, n: fx.Node) -> str:
    """The model's top-level child that holds ``n`` ("" for the root's own ops)."""
    stack = list((n.meta.get("nn_module_stack") or {}).values())
    path = a.unit.full_name(stack[0][0]) if stack else a.unit.path
    return path.split(".")[0] if path else ""


def _scope_depth(n: fx.Node, last: dict[str, fx.Node]) -> int:
    """Depth of the outermost module whose output ``n`` is (0 = a child of the root); large if none."""
    depths = [p.count(".") for p, _ in (n.meta.get("nn_module_stack") or {}).values() if last.get(p) is n]
    return min(depths) if depths else 1 << 20


def _stage_sites(a: Analysis, ends: Sequence[fx.Node]) -> list[Site]:
    last = a.scope_last_nodes()
    sites = []
    for n in ends:
        scopes = [p for p, _ in (n.meta.get("nn_module_stack") or {}).values() if last.get(p) is n]
        name = "" if a.unit.path and n is a.returned else scopes[0] if scopes else a.keys[n]
        sites.append(_site(a, "stage", name, n, reason="stage output"))
    return sites


def _module_sites(a: Analysis, pattern: str) -> list[Site]:
    matcher = _matcher(pattern)
    last = a.scope_last_nodes()
    calls_of: dict[str, list[fx.Node]] = {}
    for n in a.nodes:
        if n.op == "call_module":
            calls_of.setdefault(str(n.target), []).append(n)
    sites = []
    for path, mod in a.unit.module.named_modules():
        if not path or not (matcher(a.unit.full_name(path)) or type(mod).__name__ == pattern):
            continue
        if is_attention(mod):
            continue
        calls = calls_of.get(path, [])
        if calls:
            for n in calls:
                sites.append(_site(a, "module", a.keys[n], n, reason=f"output of {type(mod).__name__}"))
        elif path in last:
            sites.append(_site(a, "module", path, last[path], reason=f"output of {type(mod).__name__}"))
    return sites


def _matcher(pattern: str):  # type: ignore[no-untyped-def]
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda name: rx.fullmatch(name) is not None
    try:
        rx = re.compile(pattern)
    except re.error:
        rx = None
    return lambda name: name == pattern or fnmatch.fnmatchcase(name, pattern) or (rx is not None and rx.fullmatch(name) is not None)


def find_unit_sites(unit: Unit, after: str) -> list[Site]:
    """All candidate sites of one traced unit for one placement, used or skipped, in graph order."""
    return find_sites_in([unit], after)


def find_sites_in(units: Sequence[Unit], after: str) -> list[Site]:
    """All candidate sites of the traced units of one model (in the order they run) for one
    placement, used or skipped, in order. Stages are numbered across the units."""
    analyses = [Analysis(u) for u in units]
    blocks = [_block_sites(a) for a in analyses]  # stage ends need the residual merges whatever the placement
    end_nodes = stage_ends(analyses, blocks)
    out = []
    before = 0
    for a, unit_blocks, unit_ends in zip(analyses, blocks, end_nodes):
        unit = a.unit
        if after == "conv":
            sites = _conv_sites(a)
        elif after == "block":
            sites = unit_blocks
        elif after == "stage":
            sites = _stage_sites(a, unit_ends)
        else:
            sites = _module_sites(a, after)
        ends = [a.index[n] for n in unit_ends]
        for s in sites:
            idx = a.index[a.by_key[s.key]]
            stage = 1 + before + sum(e < idx for e in ends)
            rel = s.name[len(unit.path) + 1 :] if unit.path else s.name  # "" for the unit's own output
            out.append(replace(s, stage=stage, module_name=cbam_module_name(unit.path, rel)))
        before += len(ends)
    return out


def cbam_module_name(unit_path: str, key: str) -> str:
    """``layer1.0.conv1`` -> ``layer1.0.cbam_conv1``; ``layer1.0.add`` -> ``layer1.0.cbam_add``."""
    if not key:  # the output of the traced part itself
        return f"{unit_path}.cbam" if unit_path else "cbam"
    parent, _, leaf = key.rpartition(".")
    leaf = re.sub(r"[^0-9A-Za-z_]", "_", leaf)
    name = f"{parent}.cbam_{leaf}" if parent else f"cbam_{leaf}"
    return f"{unit_path}.{name}" if unit_path else name


# ----------------------------------------------------------------------------- selection


def select_sites(sites: Iterable[Site], sel: Selection) -> list[Site]:
    """Apply the selection in this order: stages, min_channels, include, exclude, every, max_sites."""
    for p in sel.include + sel.exclude:
        _matcher(p)
    out: list[Site] = []
    kept = 0
    for s in sites:
        if not s.used:
            out.append(s)
            continue
        why = None
        if sel.stages is not None and s.stage is not None and not (sel.stages[0] <= s.stage <= sel.stages[1]):
            why = f"stage {s.stage} outside stages {sel.stages[0]}-{sel.stages[1]}"
        elif s.channels < sel.min_channels:
            why = f"{s.channels} channels < min_channels {sel.min_channels}"
        elif sel.include and not any(_matcher(p)(s.name) for p in sel.include):
            why = "not matched by include"
        elif any(_matcher(p)(s.name) for p in sel.exclude):
            why = "matched by exclude"
        if why is None:
            kept += 1
            if (kept - 1) % sel.every != 0:
                why = f"not one of every {sel.every} sites"
            elif sel.max_sites is not None and (kept - 1) // sel.every >= sel.max_sites:
                why = f"beyond max_sites {sel.max_sites}"
        out.append(s if why is None else replace(s, used=False, reason=why))
    return out
