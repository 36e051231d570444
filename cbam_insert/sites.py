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
  through them) before the first feature map larger than one seen before it (a decoder, neck or
  head starts there), grouped by spatial size; a stage ends at the last one that is the output of
  the shallowest module (an untraced parent counts: ultralytics' C2f returns its ``cv2``), when
  the stretch before it holds at least two conv units or one residual block. The model's output
  and maps no learnable layer reads (logits, masks) are never stage ends, and the last stage
  stays in the module that holds the earlier ones (smp's encoder, not the FPN lateral conv or PAN's pooling).
* a module name, glob or regex (``"layer4.*.bn3"``, ``"re:layer[34]\\..*"``) or a class name
  (``"Bottleneck"``): the output of every matching module.

The channel axis is tracked per node (``node.meta["cbam_axis"]``): set to 1 by convs, channel
norms and pools, to the last axis by linear layers and last-axis norms, moved by permutes and
transposes, lost by reshapes and views. Only tensors whose channel axis is 1 are sites.
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

from .attention import Attention, is_attention
from .modules import CBAM
from .recipe import Selection
from .trace import FROZEN_NORMS, Anchor, TensorInfo, Unit, anchors, is_add, node_key

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


# ----------------------------------------------------------------------------- channel axis

_AXIS1_MODULES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    CBAM,
    Attention,
)
_LAST_AXIS_MODULES: tuple[type, ...] = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Bilinear, nn.RMSNorm)
_NORM_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)
_ACT_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.PReLU,
    nn.Mish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.SELU, nn.CELU, nn.Softplus,
)  # fmt: skip
_AXIS1_FUNCS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.conv1d, torch.conv2d, torch.conv3d, F.batch_norm, F.instance_norm, F.group_norm,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.interpolate, F.pixel_shuffle, F.pixel_unshuffle, torch.max_pool2d, torch.avg_pool1d,
}  # fmt: skip
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_LAST_AXIS_FUNCS = {F.linear, F.layer_norm, F.embedding}
_NORM_FUNCS = {F.batch_norm, F.instance_norm, F.group_norm}
_ACT_FUNCS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish,
    F.leaky_relu, F.elu, F.mish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh,
}  # fmt: skip
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_SHAPE_LOST_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "expand"}
_SHAPE_LOST_FUNCS = {torch.reshape, torch.flatten, torch.unflatten, torch.stack}


def _tensor_info(node: Any) -> TensorInfo | None:
    if isinstance(node, fx.Node):
        info = node.meta.get("cbam_info")
        if isinstance(info, TensorInfo):
            return info
    return None


class _Analysis:
    """Per-graph facts every placement needs: order, channel axes, constness, modules, keys."""

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.graph = unit.graphs["eval"]
        self.modules = dict(unit.gm.named_modules())
        self.nodes: list[fx.Node] = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.keys = node_key(self.graph)
        self.by_key = {k: n for n, k in self.keys.items()}
        self.anchors = anchors(self.graph)
        out = next(n for n in reversed(self.nodes) if n.op == "output")
        self.returned = out.args[0] if isinstance(out.args[0], fx.Node) else None
        self.const: set[fx.Node] = set()
        self.axis: dict[fx.Node, int | None] = {}
        self.why: dict[fx.Node, str] = {}
        for n in self.nodes:
            self._visit(n)

    # --- channel axis
    def module_of(self, node: fx.Node) -> nn.Module | None:
        if node.op == "call_module":
            return self.modules.get(str(node.target))
        return None

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a not in self.const]

    def _visit(self, n: fx.Node) -> None:
        if n.op == "get_attr" or (n.op != "placeholder" and n.all_input_nodes and all(a in self.const for a in n.all_input_nodes)):
            self.const.add(n)
            return
        info = _tensor_info(n)
        rank = len(info.shape) if info is not None else None
        axis, why = self._axis(n, rank)
        if axis is not None and rank is not None and axis < 0:
            axis += rank
        self.axis[n] = axis
        if axis is None:
            self.why[n] = why
        n.meta["cbam_axis"] = axis

    def _axis(self, n: fx.Node, rank: int | None) -> tuple[int | None, str]:
        if n.op == "placeholder":
            return (1 if rank is not None and rank >= 3 else None), "a model input of unknown layout"
        if n.op == "output":
            return None, "output"
        mod = self.module_of(n)
        inputs = self._inputs(n)
        first = inputs[0] if inputs else None
        src_axis = self.axis.get(first) if first is not None else None
        if mod is not None:
            if isinstance(mod, _AXIS1_MODULES + FROZEN_NORMS):
                return 1, ""
            if isinstance(mod, _LAST_AXIS_MODULES):
                return -1, "a last-axis layer (linear / layer norm) defines the feature axis"
            if isinstance(mod, nn.Flatten):
                return self._flatten(src_axis, mod.start_dim, rank)
            if isinstance(mod, self.unit.leaf_types):
                return _opaque_axis(mod, _tensor_info(n))
            return self._same_shape(n, inputs)
        target = n.target
        if n.op == "call_function":
            if target in _AXIS1_FUNCS:
                return 1, ""
            if target in _LAST_AXIS_FUNCS:
                return -1, "a last-axis layer (linear / layer norm) defines the feature axis"
            if target in (torch.permute,):
                return self._permute(src_axis, _dims_arg(n.args[1:], n.kwargs.get("dims")))
            if target in (torch.transpose, torch.swapaxes):
                return self._transpose(src_axis, n.args[1:3], _rank(first))
            if target is torch.movedim:
                return None, "channel axis lost through movedim"
            if target is torch.flatten:
                return self._flatten(src_axis, _int_arg(n, 1, "start_dim", 0), rank)
            if target is torch.cat or target is torch.concat:
                return self._agree(n, inputs, "concatenation")
            if target in _SHAPE_LOST_FUNCS:
                return self._round_trip(n, getattr(target, "__name__", str(target)))
            if target is operator.getitem:
                return self._getitem(n, first, src_axis, rank)
            return self._same_shape(n, inputs)
        if n.op == "call_method":
            if target == "permute":
                return self._permute(src_axis, _dims_arg(n.args[1:], n.kwargs.get("dims")))
            if target in ("transpose", "swapaxes"):
                return self._transpose(src_axis, n.args[1:3], _rank(first))
            if target == "flatten":
                return self._flatten(src_axis, _int_arg(n, 1, "start_dim", 0), rank)
            if target in _SHAPE_LOST_METHODS:
                return self._round_trip(n, str(target))
            if target == "contiguous" or target == "to" or target == "type_as" or target == "float":
                return src_axis, self.why.get(first, "") if first is not None else ""
            return self._same_shape(n, inputs)
        return None, f"{n.op} {target}"

    def _round_trip(self, n: fx.Node, what: str) -> tuple[int | None, str]:
        """A reshape loses the channel axis, unless a chain of pure reshapes and permutes ends
        where it started: same shape as the last tensor of known layout (a channel shuffle)."""
        out = _tensor_info(n)
        cur = n
        while out is not None:
            inputs = [i for i in self._inputs(cur) if _tensor_info(i) is not None]
            if len(inputs) != 1:
                break
            cur = inputs[0]
            info = _tensor_info(cur)
            if self.axis.get(cur) is not None:
                if info is not None and info.shape == out.shape:
                    return self.axis[cur], ""
                break
            if not _is_layout_op(cur):
                break
        return None, f"channel axis lost through {what}"

    def _flatten(self, src: int | None, start: int, rank: int | None) -> tuple[int | None, str]:
        if src is not None and start > src:
            return src, ""
        return None, "channel axis lost through flatten"

    def _permute(self, src: int | None, dims: list[int] | None) -> tuple[int | None, str]:
        if src is None or dims is None:
            return None, "channel axis lost through permute"
        dims = [d % len(dims) for d in dims]
        return dims.index(src), "permuted"

    def _transpose(self, src: int | None, pair: Sequence[Any], rank: int | None) -> tuple[int | None, str]:
        if src is None or len(pair) < 2 or rank is None or not all(isinstance(p, int) for p in pair):
            return None, "channel axis lost through transpose"
        a, b = (p % rank for p in pair)
        return (b if src == a else a if src == b else src), "transposed"

    def _getitem(self, n: fx.Node, first: fx.Node | None, src: int | None, rank: int | None) -> tuple[int | None, str]:
        if first is None:
            return None, "indexing"
        info_in = first.meta.get("cbam_info")
        if isinstance(info_in, tuple):  # an element of a tuple output (chunk, split, a module's tuple)
            return src, self.why.get(first, "")
        src_info = _tensor_info(first)
        if src_info is not None and rank is not None and len(src_info.shape) == rank:
            return src, self.why.get(first, "")
        return None, "channel axis lost through indexing"

    def _agree(self, n: fx.Node, inputs: list[fx.Node], what: str) -> tuple[int | None, str]:
        axes = {self.axis.get(a) for a in inputs if _tensor_info(a) is not None}
        if len(axes) == 1:
            axis = axes.pop()
            return axis, "" if axis is not None else f"{what} of tensors of unknown layout"
        return None, f"{what} of tensors with different channel axes"

    def _same_shape(self, n: fx.Node, inputs: list[fx.Node]) -> tuple[int | None, str]:
        out = _tensor_info(n)
        if out is None:
            if inputs and isinstance(inputs[0].meta.get("cbam_info"), tuple) is False:
                return self.axis.get(inputs[0]), ""
            return (self.axis.get(inputs[0]) if inputs else None), ""
        same = [a for a in inputs if (_tensor_info(a) is not None and _tensor_info(a).shape == out.shape)]  # type: ignore[union-attr]
        if not same:
            return None, f"channel axis lost through {_describe(n)}"
        axes = {self.axis.get(a) for a in same}
        if len(axes) == 1:
            axis = axes.pop()
            return axis, self.why.get(same[0], "") if axis is None else ""
        known = {a for a in axes if a is not None}
        if len(known) == 1 and len(axes) == 2:
            return known.pop(), ""
        return None, "operands disagree on the channel axis"

    # --- helpers for placements
    def feature_map(self, n: fx.Node) -> tuple[bool, str]:
        """Whether ``n`` is a channels-first feature map, and if not, why."""
        info = _tensor_info(n)
        if info is None:
            return False, "not a single tensor"
        if len(info.shape) < 3:
            return False, f"a {len(info.shape)}-D tensor {list(info.shape)}, not (N, C, *spatial)"
        if not info.dtype.is_floating_point:
            return False, f"a {info.dtype} tensor"
        axis = self.axis.get(n)
        if axis == 1 and all(d == 1 for d in info.shape[2:]):
            return False, f"a global descriptor {list(info.shape)}: no spatial extent to attend over"
        if len(info.shape) > 5:
            return False, f"a {len(info.shape)}-D tensor: CBAM handles 1-D, 2-D and 3-D maps"
        if axis == 1:
            return True, ""
        if axis is None:
            return False, f"channel axis unknown ({self.why.get(n) or 'no layer defines it'})"
        return False, f"channel axis is {axis}, not 1 (channels-last or token layout {list(info.shape)})"

    def followed_by_cbam(self, n: fx.Node) -> bool:
        users = list(n.users)
        return len(users) == 1 and is_attention(self.module_of(users[0]))

    def is_cbam(self, n: fx.Node) -> bool:
        return is_attention(self.module_of(n))

    def attention_at(self, n: fx.Node) -> nn.Module | None:
        """The attention module that is ``n`` or its only user, if any."""
        if self.is_cbam(n):
            return self.module_of(n)
        users = list(n.users)
        return self.module_of(users[0]) if self.followed_by_cbam(n) else None

    def scope_last_nodes(self) -> dict[str, fx.Node]:
        last: dict[str, fx.Node] = {}
        for n in self.nodes:
            for path, _ in (n.meta.get("nn_module_stack") or {}).values():
                last[path] = n
        return last


_LAYOUT_METHODS = _SHAPE_LOST_METHODS | {"permute", "transpose", "contiguous"}
_LAYOUT_FUNCS = _SHAPE_LOST_FUNCS | {torch.permute, torch.transpose}


def _is_layout_op(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _LAYOUT_METHODS
    return n.op == "call_function" and n.target in _LAYOUT_FUNCS


def _describe(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target))


def _carries_tensor(n: fx.Node) -> bool:
    info = n.meta.get("cbam_info")
    if isinstance(info, tuple):
        return any(isinstance(i, TensorInfo) for i in info)
    return isinstance(info, TensorInfo)


def _upsamples(a: _Analysis, n: fx.Node) -> bool:
    """``n`` reads only channels-first maps smaller than its output (interpolate, transposed conv).
    A permute back from the channels-last layout does not count: what it reads has another axis."""
    out = _tensor_info(n)
    if out is None:
        return False
    maps = [(i, info) for i in a._inputs(n) if (info := _tensor_info(i)) is not None and len(info.shape) == len(out.shape)]
    return bool(maps) and all(
        a.axis.get(i) == 1 and any(s < t for s, t in zip(info.shape[2:], out.shape[2:])) for i, info in maps
    )


def _rank(n: fx.Node | None) -> int | None:
    info = _tensor_info(n)
    return len(info.shape) if info is not None else None


def _dims_arg(args: Sequence[Any], kw: Any) -> list[int] | None:
    dims = kw if kw is not None else (args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args))
    if dims and all(isinstance(d, int) for d in dims):
        return list(dims)
    return None


def _int_arg(n: fx.Node, pos: int, name: str, default: int) -> int:
    value = n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)
    return value if isinstance(value, int) else default


# ----------------------------------------------------------------------------- placements


def _is_conv(a: _Analysis, n: fx.Node) -> bool:
    """A convolution, or an opaque module (one that does not trace) whose output its last conv or
    channel norm defines (``MobileNetV2ConvLayer``: padding computed with ``int()``, conv, norm, act)."""
    mod = a.module_of(n)
    if mod is not None:
        if isinstance(mod, a.unit.leaf_types):
            return a.axis.get(n) == 1 and any(isinstance(m, nn.modules.conv._ConvNd) for m in mod.modules())
        return isinstance(mod, nn.modules.conv._ConvNd)
    return n.op == "call_function" and n.target in _CONV_FUNCS


def _opaque_axis(mod: nn.Module, info: TensorInfo | None) -> tuple[int | None, str]:
    """Channel axis of an opaque module's output: 1 when the last layer inside it that defines an
    axis is a conv or channel norm with as many channels as the output's dim 1."""
    channels = None
    for m in mod.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            channels = m.out_channels
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            channels = m.num_features
        elif isinstance(m, nn.GroupNorm):
            channels = m.num_channels
        elif isinstance(m, _LAST_AXIS_MODULES):
            channels = None
    if info is not None and len(info.shape) >= 3 and channels is not None and info.shape[1] == channels:
        return 1, ""
    return None, f"the output of {type(mod).__name__}, which does not trace"


def _is_norm(a: _Analysis, n: fx.Node) -> bool:
    mod = a.module_of(n)
    if mod is not None:
        return isinstance(mod, _NORM_MODULES + FROZEN_NORMS)
    return n.op == "call_function" and n.target in _NORM_FUNCS


def _is_act(a: _Analysis, n: fx.Node) -> bool:
    mod = a.module_of(n)
    if mod is not None:
        return isinstance(mod, _ACT_MODULES)
    if n.op == "call_function":
        return n.target in _ACT_FUNCS
    return n.op == "call_method" and n.target in _ACT_METHODS


def _sole_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def conv_units(a: _Analysis) -> list[tuple[fx.Node, fx.Node]]:
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


def _site(a: _Analysis, kind: str, name_key: str, node: fx.Node, operand: fx.Node | None = None, reason: str = "") -> Site:
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


def _conv_sites(a: _Analysis) -> list[Site]:
    sites = []
    for conv, end in conv_units(a):
        chain = "+".join(_short(a, x) for x in _chain(conv, end))
        site = _site(a, "conv", a.keys[conv], end, reason=f"after {chain}")
        why = _not_learnable(a, conv)
        sites.append(replace(site, used=False, reason=why) if why and site.used else site)
    return sites


def _not_learnable(a: _Analysis, conv: fx.Node) -> str:
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


def _short(a: _Analysis, n: fx.Node) -> str:
    mod = a.module_of(n)
    return type(mod).__name__ if mod is not None else _describe(n)


def _ancestry(a: _Analysis, x: fx.Node, y: fx.Node) -> tuple[fx.Node | None, dict[fx.Node, int]]:
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


def _path_nodes(a: _Analysis, fork: fx.Node, end: fx.Node, side: int, seen: dict[fx.Node, int]) -> tuple[int, list[fx.Node]]:
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


def _block_sites(a: _Analysis) -> list[Site]:
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


def _mixes_earlier(a: _Analysis, fork: fx.Node, members: Sequence[fx.Node]) -> bool:
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


def _skip(a: _Analysis, kind: str, key: str, n: fx.Node, reason: str) -> Site:
    info = _tensor_info(n)
    shape = tuple(int(s) for s in info.shape) if info is not None else ()
    return Site(a.unit.full_name(key), kind, _channels(a, n, shape), shape, False, reason, a.unit.path, key)


def _channels(a: _Analysis, n: fx.Node, shape: Sequence[int]) -> int:
    """dim 1 of a channels-first tensor; 0 (unknown) when dim 1 is not a channel axis."""
    return int(shape[1]) if len(shape) > 1 and a.axis.get(n) == 1 else 0


def _cut_vertices(a: _Analysis, stop: int) -> list[fx.Node]:
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


def _learnable_after(a: _Analysis) -> set[fx.Node]:
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


def _stage_candidates(a: _Analysis, ui: int, block_sites: Sequence[Site], smallest: tuple[int, ...] | None) -> tuple[list[_Candidate], tuple[int, ...] | None, bool]:
    """One unit's possible stage ends, the smallest resolution seen after it, and whether the
    backbone ended in it (a feature map larger than one before it: a decoder, neck or head)."""
    convs = [a.index[c] for c, _ in conv_units(a)]
    merges = [a.index[a.by_key[s.key]] for s in block_sites if s.used]
    stop, ended = len(a.nodes), False
    for n in a.nodes:
        ok, _ = a.feature_map(n)
        if not ok:
            continue
        size = tuple(_tensor_info(n).shape[2:])  # type: ignore[union-attr]
        if smallest is not None and len(size) == len(smallest) and any(s > m for s, m in zip(size, smallest)):
            stop, ended = a.index[n], True
            break
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


def stage_ends(analyses: Sequence[_Analysis], blocks: Sequence[Sequence[Site]]) -> list[list[fx.Node]]:
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
    chosen: list[tuple[_Analysis, fx.Node]] = []
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


def _outer(a: _Analysis, n: fx.Node) -> str:
    """The model's top-level child that holds ``n`` ("" for the root's own ops)."""
    stack = list((n.meta.get("nn_module_stack") or {}).values())
    path = a.unit.full_name(stack[0][0]) if stack else a.unit.path
    return path.split(".")[0] if path else ""


def _scope_depth(n: fx.Node, last: dict[str, fx.Node]) -> int:
    """Depth of the outermost module whose output ``n`` is (0 = a child of the root); large if none."""
    depths = [p.count(".") for p, _ in (n.meta.get("nn_module_stack") or {}).values() if last.get(p) is n]
    return min(depths) if depths else 1 << 20


def _stage_sites(a: _Analysis, ends: Sequence[fx.Node]) -> list[Site]:
    last = a.scope_last_nodes()
    sites = []
    for n in ends:
        scopes = [p for p, _ in (n.meta.get("nn_module_stack") or {}).values() if last.get(p) is n]
        name = "" if a.unit.path and n is a.returned else scopes[0] if scopes else a.keys[n]
        sites.append(_site(a, "stage", name, n, reason="stage output"))
    return sites


def _module_sites(a: _Analysis, pattern: str) -> list[Site]:
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
    analyses = [_Analysis(u) for u in units]
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
