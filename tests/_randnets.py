"""Small random CNNs for the property tests, built from a plain-data spec.

A spec is a dict of primitives (so a pickled model loads with the weights-only unpickler)::

    {"dims": 2, "in_ch": 3, "size": [6, 5], "head": "map",
     "layers": [["conv", {...}], ["res", {...}], ...]}

``RandNet(spec)`` builds the modules; its ``forward`` walks the spec, so the same spec always
gives the same architecture and the same module names. ``spec_strategy()`` generates specs
with hypothesis: conv/norm/activation units, residual blocks (identity or projection shortcut,
merged by ``+``, ``+=``, ``torch.add``, ``Tensor.add`` or ``Tensor.add_``, branch on either side),
ConvNeXt blocks (a branch through the channels-last layout and back), Swin-style residual adds in
the channels-last layout (not sites), concatenations (inception and dense style), pooling (modules
and functions), ``F.interpolate``, squeeze and excitation gates, top-down merges (pool, conv,
upsample, add: not residual blocks) and element-wise functions, in 1-D, 2-D and 3-D.

The classes live at module level so that a pickled model can be loaded again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["RandNet", "spec_strategy"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_F_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_F_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_F_ADAPTIVE_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class ConvUnit(nn.Module):
    """conv -> optional norm -> optional activation (a module, ``F.relu`` or ``Tensor.relu``)."""

    def __init__(
        self, dims: int, cin: int, cout: int, k: int = 3, stride: int = 1, norm: str = "bn", act: str = "relu"
    ) -> None:
        super().__init__()
        self.conv = _CONV[dims](cin, cout, k, stride=stride, padding=k // 2, bias=norm == "none")
        if norm == "bn":
            self.norm = _BN[dims](cout)
        elif norm == "gn":
            self.norm = nn.GroupNorm(1, cout)
        else:
            self.norm = None
        self.act_kind = act
        self.act = {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "silu": nn.SiLU()}.get(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        elif self.act_kind == "F.relu":
            x = F.relu(x)
        elif self.act_kind == "method":
            x = x.relu()
        return x


class ResBlock(nn.Module):
    """``branch(x) (+) shortcut(x)`` then an optional ReLU.

    ``merge`` is ``plus`` (``a + b``), ``iadd`` (``a += b``), ``torch.add``, ``Tensor.add`` or
    ``Tensor.add_``;
    ``branch_first`` puts the branch on the left of the merge. The branch is always longer
    than the shortcut, so it is the residual branch CBAM belongs on; its last unit has no
    activation (as in ResNet, which also keeps ``+=`` on it valid for autograd).
    """

    def __init__(self, dims: int, cin: int, cout: int, stride: int, n_units: int, merge: str, branch_first: bool,
                 proj: bool, post_act: bool) -> None:  # fmt: skip
        super().__init__()
        units = []
        c = cin
        for i in range(n_units):
            last = i == n_units - 1
            units.append(ConvUnit(dims, c, cout, 3, stride if i == 0 else 1, "bn", "none" if last else "relu"))
            c = cout
        self.branch = nn.Sequential(*units)
        self.proj = ConvUnit(dims, cin, cout, 1, stride, "bn", "none") if proj else None
        self.merge = merge
        self.branch_first = branch_first
        self.post_act = post_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch(x)
        s = self.proj(x) if self.proj is not None else x
        left, right = (b, s) if self.branch_first else (s, b)
        if self.merge == "plus":
            out = left + right
        elif self.merge == "iadd":
            out = left
            out += right
        elif self.merge == "Tensor.add_":
            out = left.add_(right)
        elif self.merge == "torch.add":
            out = torch.add(left, right)
        else:
            out = left.add(right)
        return F.relu(out) if self.post_act else out


class CatBlock(nn.Module):
    """Inception style ``cat([unit_a(x), unit_b(x)])`` or dense style ``cat([x, unit_a(x)])``."""

    def __init__(self, dims: int, cin: int, ca: int, cb: int, dense: bool) -> None:
        super().__init__()
        self.a = ConvUnit(dims, cin, ca, 3, 1, "bn", "relu")
        self.b = None if dense else ConvUnit(dims, cin, cb, 1, 1, "none", "F.relu")
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = x if self.b is None else self.b(x)
        return torch.cat([other, self.a(x)], dim=1)


class TopDown(nn.Module):
    """``x + upsample(conv(pool(x)))``: an FPN-like merge, which is not a residual block."""

    def __init__(self, dims: int, c: int) -> None:
        super().__init__()
        self.dims = dims
        self.conv = _CONV[dims](c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.conv(_F_MAXPOOL[self.dims](x, 2))
        return x + F.interpolate(low, scale_factor=2.0, mode="nearest")


class SEGate(nn.Module):
    """Squeeze and excitation: ``x * sigmoid(conv(relu(conv(avgpool(x)))))``."""

    def __init__(self, dims: int, c: int) -> None:
        super().__init__()
        self.dims = dims
        self.fc1 = _CONV[dims](c, max(1, c // 2), 1)
        self.fc2 = _CONV[dims](max(1, c // 2), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _F_ADAPTIVE_AVG[self.dims](x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


def _to_last(x: torch.Tensor, dims: int) -> torch.Tensor:
    """(N, C, *spatial) -> (N, *spatial, C)"""
    return x.permute(0, *range(2, dims + 2), 1)


def _to_first(x: torch.Tensor, dims: int) -> torch.Tensor:
    """(N, *spatial, C) -> (N, C, *spatial)"""
    return x.permute(0, dims + 1, *range(1, dims + 1))


class ConvNeXtBlock(nn.Module):
    """``x + permute(mlp(layer_norm(permute(dwconv(x)))))``: a residual branch that goes through the
    channels-last layout and comes back to channels first, where CBAM belongs after the last permute."""

    def __init__(self, dims: int, c: int) -> None:
        super().__init__()
        self.dims = dims
        self.dw = _CONV[dims](c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _to_last(self.dw(x), self.dims)
        return x + _to_first(self.fc2(self.act(self.fc1(self.norm(y)))), self.dims)


class ChannelsLastBlock(nn.Module):
    """Swin style: the residual add happens in the (N, *spatial, C) layout, so it is not a site."""

    def __init__(self, dims: int, c: int) -> None:
        super().__init__()
        self.dims = dims
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = _to_last(x, self.dims)
        t = t + self.fc(self.norm(t))
        return _to_first(t, self.dims)


class Pool(nn.Module):
    """Stride-2 pooling, as a module (``max``/``avg``) or a function (``F.max``/``F.avg``)."""

    def __init__(self, dims: int, kind: str) -> None:
        super().__init__()
        self.dims = dims
        self.kind = kind
        self.pool = {"max": _MAXPOOL, "avg": _AVGPOOL}.get(kind, {}).get(dims)
        if self.pool is not None:
            self.pool = self.pool(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            return self.pool(x)
        fn = _F_MAXPOOL if self.kind == "F.max" else _F_AVGPOOL
        return fn[self.dims](x, 2)


class RandNet(nn.Module):
    """A CNN whose layers and ``forward`` follow ``spec`` (see the module doc)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        d = spec["dims"]
        c = spec["in_ch"]
        self.layers = nn.ModuleList()
        for kind, p in spec["layers"]:
            if kind == "conv":
                self.layers.append(ConvUnit(d, c, p["out"], p["k"], p["stride"], p["norm"], p["act"]))
                c = p["out"]
            elif kind == "res":
                self.layers.append(ResBlock(d, c, p["out"], p["stride"], p["n_units"], p["merge"], p["branch_first"],
                                            p["proj"], p["post_act"]))  # fmt: skip
                c = p["out"]
            elif kind == "cat":
                self.layers.append(CatBlock(d, c, p["a"], p["b"], p["dense"]))
                c = c + p["a"] if p["dense"] else p["a"] + p["b"]
            elif kind == "pool":
                self.layers.append(Pool(d, p["kind"]))
            elif kind == "topdown":
                self.layers.append(TopDown(d, c))
            elif kind == "convnext":
                self.layers.append(ConvNeXtBlock(d, c))
            elif kind == "channels_last":
                self.layers.append(ChannelsLastBlock(d, c))
            elif kind == "se":
                self.layers.append(SEGate(d, c))
            else:  # "up" and "func" hold no parameters
                self.layers.append(nn.Identity())
        self.fc = nn.Linear(c, 3) if spec["head"] == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (kind, p), layer in zip(self.spec["layers"], self.layers):
            if kind == "up":
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            elif kind == "func":
                if p["op"] == "relu":
                    x = F.relu(x)
                elif p["op"] == "swish":
                    x = x * torch.sigmoid(x)
                elif p["op"] == "scale":
                    x = x * 0.5 + 1.0
                else:
                    x = x.tanh()
            else:
                x = layer(x)
        if self.fc is not None:
            x = self.fc(torch.flatten(_F_ADAPTIVE_AVG[self.spec["dims"]](x, 1), 1))
        return x

    def example_input(self, batch: int = 2) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        return torch.randn(batch, self.spec["in_ch"], *self.spec["size"], generator=g)


# ----------------------------------------------------------------------------- generation

_SMALL = st.integers(1, 6)


@st.composite
def _layer(draw: st.DrawFn, dims: int, c: int, size: list[int]) -> tuple[list[Any], int, list[int]]:
    """One layer that fits the current channels and spatial size, and the new channels and size."""
    can_down = all(s >= 2 for s in size)
    even = all(s >= 2 and s % 2 == 0 for s in size)
    kinds = ["conv", "res", "res", "cat", "func", "se", "convnext", "channels_last"]
    if can_down:
        kinds.append("pool")
    if even:
        kinds.append("topdown")
    if max(size) <= 3:
        kinds.append("up")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        stride = draw(st.sampled_from([1, 2])) if can_down else 1
        p = {"out": draw(_SMALL), "k": draw(st.sampled_from([1, 3])), "stride": stride,
             "norm": draw(st.sampled_from(["bn", "gn", "none"])),
             "act": draw(st.sampled_from(["relu", "relu_inplace", "silu", "F.relu", "method", "none"]))}  # fmt: skip
        return ["conv", p], p["out"], [(s + stride - 1) // stride for s in size]
    if kind == "res":
        stride = draw(st.sampled_from([1, 2])) if can_down else 1
        out = draw(st.sampled_from([c, c, draw(_SMALL)]))
        proj = stride != 1 or out != c or draw(st.booleans())
        merge = draw(st.sampled_from(["plus", "iadd", "torch.add", "Tensor.add", "Tensor.add_"]))
        branch_first = draw(st.booleans()) or (merge in ("iadd", "Tensor.add_") and not proj)  # never x += branch
        p = {"out": out, "stride": stride, "n_units": draw(st.sampled_from([1, 2])) if not proj else 2,
             "merge": merge, "branch_first": branch_first, "proj": proj, "post_act": draw(st.booleans())}  # fmt: skip
        return ["res", p], out, [(s + stride - 1) // stride for s in size]
    if kind == "cat":
        p = {"a": draw(_SMALL), "b": draw(_SMALL), "dense": draw(st.booleans())}
        return ["cat", p], (c + p["a"] if p["dense"] else p["a"] + p["b"]), size
    if kind == "pool":
        return ["pool", {"kind": draw(st.sampled_from(["max", "avg", "F.max", "F.avg"]))}], c, [s // 2 for s in size]
    if kind == "up":
        return ["up", {}], c, [s * 2 for s in size]
    if kind == "func":
        return ["func", {"op": draw(st.sampled_from(["relu", "swish", "scale", "tanh"]))}], c, size
    return [kind, {}], c, size


@st.composite
def spec_strategy(draw: st.DrawFn, max_layers: int = 5) -> dict[str, Any]:
    """A random RandNet spec: 1-D/2-D/3-D, a conv stem, then up to ``max_layers`` layers."""
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    hi = {1: 12, 2: 7, 3: 4}[dims]
    size = [draw(st.integers(2, hi)) for _ in range(dims)]
    in_ch = draw(st.integers(1, 4))
    c = draw(_SMALL)
    layers: list[Any] = [["conv", {"out": c, "k": 3, "stride": 1, "norm": "bn", "act": "relu"}]]
    cur = list(size)
    for _ in range(draw(st.integers(0, max_layers))):
        layer, c, cur = draw(_layer(dims, c, cur))
        layers.append(layer)
    return {
        "dims": dims,
        "in_ch": in_ch,
        "size": size,
        "layers": layers,
        "head": draw(st.sampled_from(["map", "linear"])),
    }
