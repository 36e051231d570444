"""The channel-axis pass: per graph, which axis of each tensor is its channel axis, and the facts
every placement needs (order, constness, modules, keys). Read-only.

The channel axis is tracked per node (``node.meta["cbam_axis"]``): set to 1 by convs, channel
norms and pools, to the last axis by linear layers and last-axis norms, moved by permutes and
transposes, lost by reshapes and views. Only tensors whose channel axis is 1 are sites
(``cbam_insert.sites``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .attention import Attention, is_attention
from .modules import CBAM
from .trace import FROZEN_NORMS, TensorInfo, Unit, anchors, node_key

__all__ = ["Analysis"]

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


class Analysis:
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


def _upsamples(a: Analysis, n: fx.Node) -> bool:
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
