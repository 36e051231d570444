"""CBAM and its two parts: the only place in the package that knows the maths.

Channel attention (a C-vector per sample)::

    Mc(F) = sigmoid( sum_p MLP(Pool_p(F)) )      p in pool_types, default (avg, max)

with ``MLP = C -> hidden -> C`` and a ReLU between, the same weights for every pooled
descriptor. Spatial attention (one map per sample)::

    Ms(F) = sigmoid( conv_kxk([mean_c(F) ; max_c(F)]) )

and CBAM composes them, channel first by default::

    F' = Mc(F) * F,    F'' = Ms(F') * F'

Example::

    >>> import torch
    >>> from cbam_insert import CBAM
    >>> cbam = CBAM(64)                         # variant='plain': r=16, k=7, no biases
    >>> cbam(torch.randn(2, 64, 28, 28)).shape
    torch.Size([2, 64, 28, 28])
    >>> sum(p.numel() for p in cbam.parameters()) == 2 * 64 * 4 + 2 * 7 * 7
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .options import ModuleConfig, odd, option, positive

__all__ = ["CBAM", "INITS", "ORDERS", "POOL_TYPES", "VARIANTS", "CBAMConfig", "ChannelAttention", "SpatialAttention"]

POOL_TYPES = ("avg", "max", "lp", "lse")
ORDERS = ("channel_first", "spatial_first", "parallel")
VARIANTS = ("plain", "official")
_OLD_VARIANT_NAMES = {"seed": "plain"}  # recipes written before the rename still load
INITS = ("default", "identity")
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_bool(name: str, value: object, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        allowed = "True, False or None" if optional else "True or False"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_dims(dims: object) -> int:
    if dims not in (1, 2, 3) or isinstance(dims, bool):
        raise ValueError(f"dims must be 1, 2 or 3 (for (N,C,L), (N,C,H,W), (N,C,T,H,W)), got {dims!r}")
    return int(dims)  # type: ignore[arg-type]


def _check_input(x: torch.Tensor, channels: int, dims: int, what: str) -> None:
    if torch.jit.is_tracing():  # sizes are traced tensors there: comparing them warns, and the trace fixes them anyway
        return
    if x.dim() != dims + 2 or x.shape[1] != channels:
        expected = "(N, " + str(channels) + ", " + ", ".join(["*"] * dims) + ")"
        raise ValueError(what + " expects input of shape " + expected + ", got " + str(list(x.shape)))


def _spatial_dims(x: torch.Tensor) -> list[int]:
    return list(range(2, x.dim()))


class ChannelAttention(nn.Module):
    """Channel gate ``Mc(F) = sigmoid(sum_p MLP(Pool_p(F)))``, returned as an (N, C) tensor.

    The pooled descriptors of all ``pool_types`` are stacked and go through the shared MLP in
    one call. ``lp`` is the L2 norm over spatial positions and ``lse`` the log-sum-exp, as in
    the authors' released code. The hidden width is ``hidden`` when given, else
    ``max(1, channels // reduction)``, so it is never 0. Works for any number of spatial dims.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        hidden: int | None = None,
        pool_types: Sequence[str] = ("avg", "max"),
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.channels = _check_positive_int("channels", channels)
        _check_positive_int("reduction", reduction)
        if hidden is not None:
            _check_positive_int("hidden", hidden)
        _check_bool("mlp_bias", bias)
        if isinstance(pool_types, str):
            pool_types = (pool_types,)
        try:
            pool_types = tuple(pool_types)
        except TypeError:
            raise TypeError(f"pool_types must be a sequence of names from {POOL_TYPES}, got {pool_types!r}") from None
        if not pool_types:
            raise ValueError(f"pool_types must name at least one of {POOL_TYPES}")
        for p in pool_types:
            if p not in POOL_TYPES:
                raise ValueError(f"pool_types: unknown pooling type {p!r}; choose from {POOL_TYPES}")
        if len(set(pool_types)) != len(pool_types):
            raise ValueError(f"pool_types must not repeat a pooling type, got {pool_types!r}")
        self.pool_types: list[str] = list(pool_types)
        self.hidden = hidden if hidden is not None else max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, self.hidden, bias=bias)
        self.fc2 = nn.Linear(self.hidden, channels, bias=bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, pool_types={self.pool_types}"

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The descriptors of ``pool_types``, stacked: (len(pool_types), N, C)."""
        dims = _spatial_dims(x)
        pooled: list[torch.Tensor] = []
        for p in self.pool_types:
            if p == "avg":
                pooled.append(x.mean(dim=dims))
            elif p == "max":
                pooled.append(x.amax(dim=dims))
            elif p == "lp":
                pooled.append(torch.linalg.vector_norm(x, ord=2, dim=dims))
            else:
                pooled.append(torch.logsumexp(x, dim=dims))
        return torch.stack(pooled, dim=0)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid channel scores (N, C) from the stacked descriptors: one MLP call for all."""
        return self.fc2(F.relu(self.fc1(pooled))).sum(dim=0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid channel scores, (N, C)."""
        return self.head(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class SpatialAttention(nn.Module):
    """Spatial gate ``Ms(F) = sigmoid(conv([mean_c F ; max_c F]))``, returned as (N, 1, *spatial).

    A 2-in, 1-out convolution with an odd ``kernel_size`` and padding ``kernel_size // 2`` keeps
    the map's size. ``order="mean_max"`` is the plain variant's input order; the authors' code stacks
    ``[max ; mean]`` and puts a BatchNorm (eps 1e-5, momentum 0.01) after the convolution
    (``norm=True``).
    """

    def __init__(
        self,
        kernel_size: int = 7,
        dims: int = 2,
        bias: bool = False,
        norm: bool = False,
        order: str = "mean_max",
    ) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        if order not in ("mean_max", "max_mean"):
            raise ValueError(f"order must be 'mean_max' or 'max_mean', got {order!r}")
        _check_bool("spatial_norm", norm)
        self.dims = _check_dims(dims)
        self.kernel_size = kernel_size
        self.max_first = order == "max_mean"
        self.conv = _CONVS[self.dims](2, 1, kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = _NORMS[self.dims](1, eps=1e-5, momentum=0.01) if norm else None

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, dims={self.dims}, order={'max_mean' if self.max_first else 'mean_max'!r}"
        )

    def stack(self, mean: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        """The conv's 2-channel input from the channel mean and max, each (N, 1, *spatial)."""
        return torch.cat([mx, mean] if self.max_first else [mean, mx], dim=1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[mean_c x ; max_c x]`` (or ``[max ; mean]``), (N, 2, *spatial)."""
        return self.stack(x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid map (N, 1, *spatial) from the pooled 2-channel input."""
        out = self.conv(pooled)
        if self.norm is not None:
            out = self.norm(out)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid spatial map, (N, 1, *spatial)."""
        return self.head(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def _pool_types(name: str, value: tuple[str, ...]) -> None:
    for p in value:
        if p not in POOL_TYPES:
            raise ValueError(f"{name}: unknown pooling type {p!r}; choose from {POOL_TYPES}")


@dataclass(frozen=True)
class CBAMConfig(ModuleConfig):
    module: ClassVar[str] = "cbam"
    reduction: int = option(
        16, "CBAM: channel MLP reduction, hidden width max(1, C // R)", check=positive, metavar="R", example="8"
    )
    hidden: int | None = option(
        None, "CBAM: exact MLP hidden width instead of C // R", check=positive, metavar="H", example="32"
    )
    kernel_size: int = option(7, "CBAM/GAM/triplet: odd spatial kernel", check=odd, metavar="K", example="3")
    pool_types: tuple[str, ...] = option(
        ("avg", "max"), "CBAM: channel-branch pooling, comma-separated from avg, max, lp, lse",
        check=_pool_types, metavar="LIST", example="avg,max,lp",
    )  # fmt: skip
    channel: bool = option(True, "CBAM: the channel gate (--no-channel: spatial attention only)")
    spatial: bool = option(True, "CBAM: the spatial gate (--no-spatial: channel attention only)")
    order: str = option(
        "channel_first", "CBAM: channel_first (the paper), spatial_first, or parallel (both gates from the input)",
        choices=ORDERS, metavar="ORDER", example="parallel",
    )  # fmt: skip
    variant: str = option(
        "plain", "CBAM: plain (bias-free MLP and conv) or official (the authors' code: MLP biases, [max; mean] "
        "spatial input, BatchNorm after the spatial conv)", choices=VARIANTS, metavar="NAME",
        example="official", aliases=_OLD_VARIANT_NAMES,
    )  # fmt: skip
    mlp_bias: bool | None = option(None, "CBAM: override the variant's choice of MLP biases")
    spatial_norm: bool | None = option(
        None, "CBAM: override the variant's choice of a BatchNorm after the spatial conv"
    )

    def check(self) -> None:
        if not (self.channel or self.spatial):
            raise ValueError("channel and spatial cannot both be False: CBAM would do nothing")


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018) for 1-D, 2-D and 3-D maps.

    ``CBAM(channels)`` is the plain variant: reduction 16, spatial kernel 7, bias-free MLP and
    spatial conv, spatial input ``[mean ; max]``, channel then spatial. It has
    ``2*C*max(1, C//16) + 2*k*k`` parameters.

    Options (keyword arguments, declared once by ``CBAMConfig`` and validated there):

    * ``reduction`` or ``hidden``: MLP width ``max(1, C // reduction)`` or exactly ``hidden``.
    * ``kernel_size``: odd spatial kernel (7 default, 3 common).
    * ``pool_types``: channel-branch descriptors from ``("avg", "max", "lp", "lse")``.
    * ``channel`` / ``spatial``: switch a branch off (channel-only or spatial-only CBAM).
    * ``order``: ``"channel_first"`` (paper), ``"spatial_first"``, or ``"parallel"``
      (both gates computed from F: ``F'' = Mc(F) * Ms(F) * F``).
    * ``variant``: ``"plain"`` (the default, above) or ``"official"`` (the authors' released code: MLP with biases,
      ``[max ; mean]`` spatial input, BatchNorm after the spatial conv). ``mlp_bias`` and
      ``spatial_norm`` override the variant's choice.
    * ``dims``: 1, 2 or 3 for (N,C,L), (N,C,H,W), (N,C,T,H,W) feature maps.
    * ``init``: ``"default"`` (PyTorch's initialisation) or ``"identity"``.
    * ``reuse_input``: in inference (no autograd graph recorded, eager mode) write the output into
      the input tensor instead of a new one, as ``nn.ReLU(inplace=True)`` does: one full-size
      allocation less per call. Only for a caller that does not read the input again; the graph
      pass sets it at the sites where nothing else reads the site's tensor. Ignored in training,
      under tracing/compile/export/TorchScript, with ``init="identity"`` (the gate needs F), for
      a strided or inference-mode input outside inference mode, and off the fused path (other
      orders or pool types).

    Identity init: the module gets a learnable scalar gate ``gamma`` initialised to 0 and
    returns ``F + gamma * (CBAM(F) - F)`` (``torch.lerp``). At ``gamma = 0`` the output is
    exactly F in train and in eval mode, whatever the other weights are (so batch-norm
    statistics do not matter), and the gradient of ``gamma`` is ``<dL/dF'', CBAM(F) - F>``,
    which is not zero: the first optimizer step moves ``gamma`` and from then on every other
    parameter receives gradient. This is the zero-initialised residual gate used to add blocks
    to pretrained networks (ReZero, LayerScale); the attention maths inside is unchanged. The
    gate adds one parameter.

    Speed: the paper's configuration (channel then spatial, avg+max pooling, either variant)
    runs on the fused paths of ``cbam_insert.fast`` in eager mode (same values); under
    TorchScript, tracing, ``torch.compile`` and export the plain formulation below runs.
    """

    def __init__(
        self, channels: int, reduction: int = 16, *, dims: int = 2, reuse_input: bool = False, **options: Any
    ) -> None:
        super().__init__()
        self.channels = _check_positive_int("channels", channels)
        self.dims = _check_dims(dims)
        _check_bool("reuse_input", reuse_input)
        cfg = CBAMConfig.from_options({"reduction": reduction, **options})  # every option, checked once
        variant, order, init = cfg.variant, cfg.order, cfg.init
        mlp_bias, spatial_norm = cfg.mlp_bias, cfg.spatial_norm
        official = variant == "official"
        self.variant = variant
        self.order = order
        self.init_mode = init
        self.channel_gate = (
            ChannelAttention(
                channels,
                cfg.reduction,
                hidden=cfg.hidden,
                pool_types=cfg.pool_types,
                bias=official if mlp_bias is None else mlp_bias,
            )
            if cfg.channel
            else None
        )
        self.spatial_gate = (
            SpatialAttention(
                cfg.kernel_size,
                dims=self.dims,
                norm=official if spatial_norm is None else spatial_norm,
                order="max_mean" if official else "mean_max",
            )
            if cfg.spatial
            else None
        )
        self._fast = fast.fusable(self)  # the paper's configuration, which has fused paths
        self.gamma = nn.Parameter(torch.zeros(1)) if init == "identity" else None
        self.reuse_input = reuse_input

    def extra_repr(self) -> str:
        reuse = ", reuse_input=True" if self.reuse_input else ""
        return f"channels={self.channels}, dims={self.dims}, variant={self.variant!r}, order={self.order!r}{reuse}"

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        shape: list[int] = [n, self.channels] + [1] * self.dims
        cg = self.channel_gate
        sg = self.spatial_gate
        if self.order == "parallel":
            out = x
            if cg is not None:
                out = out * cg(x).view(shape)
            if sg is not None:
                out = out * sg(x)
            return out
        out = x
        if self.order == "spatial_first" and sg is not None:
            out = out * sg(out)
        if cg is not None:
            out = out * cg(out).view(shape)
        if self.order == "channel_first" and sg is not None:
            out = out * sg(out)
        return out

    @torch.jit.unused
    def _fast_path(self, x: torch.Tensor) -> torch.Tensor | None:
        return fast.attend(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels, self.dims, "CBAM")
        out: torch.Tensor | None = None
        if not torch.jit.is_scripting():
            out = self._fast_path(x)
        if out is None:
            out = self._attend(x)
        gamma = self.gamma
        if gamma is not None:
            return torch.lerp(x, out, gamma.to(x.dtype))
        return out


def cbam_parameter_count(channels: int, reduction: int = 16, kernel_size: int = 7) -> int:
    """Parameters of the plain variant's ``CBAM(channels, reduction, kernel_size=k)``."""
    return 2 * channels * max(1, channels // reduction) + 2 * kernel_size**2
