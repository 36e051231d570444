"""Attention modules other than CBAM, each as its paper defines it, and the registry of all.

Every module refines a feature map F of shape (N, C, *spatial) and returns one of the same
shape. ``dims`` is the number of spatial axes (1: (N,C,L), 2: (N,C,H,W), 3: (N,C,T,H,W)); a
module accepts the ranks its definition extends to and refuses the others with the reason.
Each declares its options once, as a dataclass (``SEConfig`` …), from which its constructor,
the keywords of ``insert_attention``, the recipe and the CLI flags derive.

=========  ==============================================  ========================================
name       paper                                           A(F)
=========  ==============================================  ========================================
cbam       Woo et al., ECCV 2018                           Ms(F') * F',  F' = Mc(F) * F
se         Hu et al., CVPR 2018                            sigmoid(W2 relu(W1 GAP(F))) * F
eca        Wang et al., CVPR 2020                          sigmoid(conv1d_k(GAP(F))) * F
coord      Hou et al., CVPR 2021                           F * g^h * g^w
simam      Yang et al., ICML 2021                          sigmoid(1 / E) * F
bam        Park et al., BMVC 2018                          F + F * sigmoid(Mc(F) + Ms(F))
gam        Liu et al., arXiv 2112.05561 (2021)             Ms(F') * F',  F' = Mc(F) * F
triplet    Misra et al., WACV 2021                         mean over branches of rotate-gate-rotate
=========  ==============================================  ========================================

Identity init (``init="identity"``, every module): a learnable scalar ``gamma`` initialised to
0 and the output ``F + gamma * (A(F) - F)`` (``torch.lerp``): exactly F in train and eval mode
whatever the other weights and batch statistics are, and trainable, since the gradient of
``gamma`` is ``<dL/dout, A(F) - F>``.

Example::

    >>> import torch
    >>> from cbam_insert.attention import ATTENTION
    >>> x = torch.randn(2, 64, 14, 14)
    >>> sorted(ATTENTION)
    ['bam', 'cbam', 'coord', 'eca', 'gam', 'se', 'simam', 'triplet']
    >>> se = ATTENTION["se"](64)
    >>> se(x).shape, sum(p.numel() for p in se.parameters()) == 2 * 64 * 4 + 4 + 64
    (torch.Size([2, 64, 14, 14]), True)
    >>> ATTENTION["eca"](64).kernel_size          # |log2(64)/2 + 1/2|_odd
    3
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .modules import CBAM, CBAMConfig, _check_input
from .options import ModuleConfig, declared, odd, option, positive

__all__ = [
    "ATTENTION",
    "BAM",
    "ECA",
    "GAM",
    "SE",
    "Attention",
    "CoordAttention",
    "SimAM",
    "TripletAttention",
    "UserAttention",
    "config_of",
    "is_attention",
    "resolve_module",
]

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def hidden_width(channels: int, reduction: int, minimum: int = 1) -> int:
    """``max(minimum, channels // reduction)``: the bottleneck never vanishes when C < r."""
    return max(minimum, channels // reduction)


def _as_map(v: torch.Tensor, dims: int) -> torch.Tensor:
    """An (N, C) vector viewed as (N, C, 1, ...) to broadcast over ``dims`` spatial axes."""
    shape: list[int] = [v.shape[0], v.shape[1]] + [1] * dims
    return v.view(shape)


def _spatial(x: torch.Tensor) -> list[int]:
    return list(range(2, x.dim()))


class Attention(nn.Module):
    """The base of the modules here: options from the config, the rank check, the identity gate.

    A subclass sets ``name``, ``Config`` and ``ranks`` (and ``rank_reason`` when it refuses a
    rank), builds its layers after ``super().__init__`` and defines ``attend(x) -> A(x)``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[ModuleConfig]] = ModuleConfig
    ranks: ClassVar[tuple[int, ...]] = (1, 2, 3)
    rank_reason: ClassVar[str] = ""
    __jit_unused_properties__: ClassVar[list[str]] = ["config"]

    def __init__(self, channels: int, dims: int = 2, **options: Any) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        if isinstance(dims, bool) or dims not in self.ranks:
            raise ValueError(self.refusal(dims))
        config = self.Config.from_options(options)
        why = self.channel_refusal(channels, config)
        if why is not None:
            raise ValueError(why)
        # plain data on the instance (a pickled model holds no config class the safe loader would refuse)
        self.options = {o.name: getattr(config, o.name) for o in declared(self.Config)}
        self.channels = channels
        self.dims = int(dims)
        self.label = self.name  # an instance attribute: TorchScript does not read class attributes
        self.init_mode = self.config.init  # type: ignore[attr-defined]
        self.gamma = nn.Parameter(torch.zeros(1)) if self.init_mode == "identity" else None

    @classmethod
    def refusal(cls, dims: object) -> str:
        """Why ``dims`` spatial axes are not accepted (one line)."""
        ranks = ", ".join(f"{r}-D" for r in cls.ranks)
        why = f" ({cls.rank_reason})" if cls.rank_reason else ""
        return f"{cls.name} handles {ranks} feature maps, not dims={dims!r}{why}"

    @classmethod
    def channel_refusal(cls, channels: int, config: ModuleConfig) -> str | None:
        """Why the module with ``config`` cannot take a map of ``channels`` channels (one line), or
        None; a site it refuses is skipped with this reason."""
        return None

    @property
    def config(self) -> ModuleConfig:
        """The module's options as its declaration (built from ``options``)."""
        return self.Config(**self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.given().items())
        return f"channels={self.channels}, dims={self.dims}" + (f", {opts}" if opts else "")

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels, self.dims, self.label)
        out = self.attend(x)
        gamma = self.gamma
        if gamma is not None:
            return torch.lerp(x, out, gamma.to(x.dtype))
        return out


def _at_least_one(n: int) -> int:
    """``max(n, 1)`` for a size; under ``jit.trace`` a size is a tensor, clamped without a Python branch."""
    if isinstance(n, torch.Tensor):  # statically false in TorchScript, where n is an int
        return n.clamp(min=1)  # type: ignore[return-value]
    return max(n, 1)


# ----------------------------------------------------------------------------- SE


@dataclass(frozen=True)
class SEConfig(ModuleConfig):
    module: ClassVar[str] = "se"
    reduction: int = option(16, "SE: bottleneck ratio r, hidden width max(1, C // r)", check=positive, metavar="R")


class SE(Attention):
    """Squeeze-and-excitation (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018).

    ``z = GAP(F)`` (eq. 2), ``s = sigmoid(W2 relu(W1 z + b1) + b2)`` (eq. 3) with
    ``W1: C -> C/r``, ``W2: C/r -> C``, and ``A(F) = s * F`` (eq. 4). r = 16 (the paper's
    default, section 6.1). Fully connected layers with biases, as in the authors' released
    models; hidden width ``max(1, C // r)``. Parameters: ``2*C*(C/r) + C/r + C``. The squeeze
    is a mean over every spatial axis, so 1-D and 3-D maps follow the same definition.
    """

    name = "se"
    Config = SEConfig

    def __init__(self, channels: int, dims: int = 2, **options: Any) -> None:
        super().__init__(channels, dims, **options)
        hidden = hidden_width(channels, self.config.reduction)  # type: ignore[attr-defined]
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(_spatial(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(z))))
        return x * _as_map(s, self.dims)


# ----------------------------------------------------------------------------- ECA


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive kernel ``k = |log2(C)/gamma + b/gamma|_odd`` (eq. 12): the authors' code
    takes the integer part ``t`` and makes it odd as ``t`` or ``t + 1``; at least 1."""
    import math

    t = int(abs((math.log2(channels) + b) / gamma))
    return max(1, t if t % 2 else t + 1)


@dataclass(frozen=True)
class ECAConfig(ModuleConfig):
    module: ClassVar[str] = "eca"
    kernel_size: int | None = option(
        None, "ECA: odd 1-D kernel across channels, by default adaptive: |log2(C)/2 + 1/2|_odd", check=odd,
        metavar="K",
    )  # fmt: skip
    k_gamma: float = option(2.0, "ECA: gamma of the adaptive kernel rule", check=positive, metavar="G")
    k_b: float = option(1.0, "ECA: b of the adaptive kernel rule", metavar="B")


class ECA(Attention):
    """Efficient channel attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep
    Convolutional Neural Networks", CVPR 2020).

    ``y = GAP(F)``, ``w = sigmoid(C1D_k(y))`` (eq. 10): a 1-D convolution across the channel
    axis, one input and one output channel, no bias, zero padding ``(k - 1) // 2``, and
    ``A(F) = w * F``. k is adaptive, ``|log2(C)/gamma + b/gamma|_odd`` with gamma = 2, b = 1
    (eq. 12; rounding as in the authors' code), unless ``kernel_size`` is given. Parameters: k.
    """

    name = "eca"
    Config = ECAConfig

    def __init__(self, channels: int, dims: int = 2, **options: Any) -> None:
        super().__init__(channels, dims, **options)
        cfg: ECAConfig = self.config  # type: ignore[assignment]
        k = cfg.kernel_size if cfg.kernel_size is not None else eca_kernel_size(channels, cfg.k_gamma, cfg.k_b)
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(_spatial(x)).unsqueeze(1)  # (N, 1, C)
        w = torch.sigmoid(self.conv(y)).squeeze(1)
        return x * _as_map(w, self.dims)


# ----------------------------------------------------------------------------- coordinate attention


@dataclass(frozen=True)
class CoordConfig(ModuleConfig):
    module: ClassVar[str] = "coord"
    reduction: int = option(32, "coord: reduction r, hidden width max(8, C // r)", check=positive, metavar="R")


class CoordAttention(Attention):
    """Coordinate attention (Hou, Zhou, Feng, "Coordinate Attention for Efficient Mobile Network
    Design", CVPR 2021).

    Pool along each spatial axis separately: ``z^h_c(h) = mean_w F_c(h, w)`` and
    ``z^w_c(w) = mean_h F_c(h, w)`` (eqs. 2-3); ``f = h_swish(BN(F1([z^h, z^w])))`` with a shared
    1x1 transform ``F1: C -> m``, ``m = max(8, C // r)`` (eq. 4); split f back into ``f^h, f^w``,
    ``g^h = sigmoid(F_h(f^h))``, ``g^w = sigmoid(F_w(f^w))`` with 1x1 transforms ``m -> C``
    (eqs. 5-6), and ``A(F)_c(h, w) = F_c(h, w) * g^h_c(h) * g^w_c(w)`` (eq. 7). r = 32, the
    minimum width 8, the h-swish activation and the biases of the 1x1 convolutions are from the
    authors' code. The 1x1 transforms act on (N, C, H + W) sequences here (``Conv1d``; the
    authors write them as ``Conv2d`` on (N, C, H + W, 1): the same maths).
    Parameters: ``C*m + m + 2*m + d*(m*C + C)`` for d spatial axes.

    3-D maps get one direction per spatial axis (pool over the other two; d = 3 gates). 1-D
    maps are refused: with one axis there is nothing to pool along.
    """

    name = "coord"
    Config = CoordConfig
    ranks = (2, 3)
    rank_reason = "it pools along each axis over the others; a 1-D map has only one axis"

    def __init__(self, channels: int, dims: int = 2, **options: Any) -> None:
        super().__init__(channels, dims, **options)
        mip = hidden_width(channels, self.config.reduction, minimum=8)  # type: ignore[attr-defined]
        self.conv1 = nn.Conv1d(channels, mip, 1)
        self.bn1 = nn.BatchNorm1d(mip)
        self.axis_convs = nn.ModuleList(nn.Conv1d(mip, channels, 1) for _ in range(self.dims))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        spatial = _spatial(x)
        pooled: list[torch.Tensor] = []
        sizes: list[int] = []
        for axis in spatial:
            others: list[int] = []
            for a in spatial:
                if a != axis:
                    others.append(a)
            pooled.append(x.mean(others))  # (N, C, size along axis)
            sizes.append(x.shape[axis])
        f = F.hardswish(self.bn1(self.conv1(torch.cat(pooled, dim=2))))
        parts = torch.split(f, sizes, dim=2)
        gates: list[torch.Tensor] = []
        for i, conv in enumerate(self.axis_convs):
            g = torch.sigmoid(conv(parts[i]))  # (N, C, size)
            shape: list[int] = [g.shape[0], g.shape[1]] + [1] * self.dims
            shape[2 + i] = sizes[i]
            gates.append(g.view(shape))
        out = x
        for i in range(len(gates) - 1, -1, -1):  # the last axis first: the faster broadcast
            out = out * gates[i]
        return out


# ----------------------------------------------------------------------------- SimAM


@dataclass(frozen=True)
class SimAMConfig(ModuleConfig):
    module: ClassVar[str] = "simam"
    e_lambda: float = option(1e-4, "SimAM: the energy's regulariser lambda", check=positive, metavar="L")


class SimAM(Attention):
    """SimAM (Yang, Zhang, Li, Xie, "SimAM: A Simple, Parameter-Free Attention Module for
    Convolutional Neural Networks", ICML 2021). Parameter-free.

    Per channel, with ``mu`` the mean over the M = H*W positions and
    ``sigma^2 = sum (t - mu)^2 / (M - 1)``, each neuron's minimal energy is
    ``e_t = 4 (sigma^2 + lambda) / ((t - mu)^2 + 2 sigma^2 + 2 lambda)`` (eq. 5), and
    ``A(F) = sigmoid(1 / E) * F`` (eq. 6), where
    ``1 / e_t = (t - mu)^2 / (4 (sigma^2 + lambda)) + 1/2``. lambda = 1e-4 (the paper's choice).
    The divisor M - 1 is the authors' code's; for a single position (M = 1) it is taken as 1,
    the limit at which every 1/e_t is 1/2. Any number of spatial axes.
    """

    name = "simam"
    Config = SimAMConfig

    def __init__(self, channels: int, dims: int = 2, **options: Any) -> None:
        super().__init__(channels, dims, **options)
        self.e_lambda = float(self.config.e_lambda)  # type: ignore[attr-defined]

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        spatial = _spatial(x)
        m = 1
        for axis in spatial:
            m *= x.shape[axis]
        # 1/e_t = ((t - mu) * s)^2 + 1/2 with s = 1 / sqrt(4 (sigma^2 + lambda)). Two-pass statistics
        # as the authors' code (mean, then squared deviations), but sum (t - mu)^2 is a norm (no
        # squared map is stored) and the square and + 1/2 are one fused multiply-add.
        d = x - x.mean(spatial, keepdim=True)
        norm = torch.linalg.vector_norm(d, 2, spatial, keepdim=True)
        s = torch.rsqrt(norm.square() * (4.0 / _at_least_one(m - 1)) + 4.0 * self.e_lambda)
        t = d * s
        inv_e = torch.addcmul(torch.full_like(s, 0.5), t, t)
        return x * torch.sigmoid(inv_e)


# ----------------------------------------------------------------------------- BAM


@dataclass(frozen=True)
class BAMConfig(ModuleConfig):
    module: ClassVar[str] = "bam"
    reduction: int = option(16, "BAM: reduction r of both branches, width max(1, C // r)", check=positive, metavar="R")
    dilation: int = option(4, "BAM: dilation d of the spatial branch's 3x3 convolutions", check=positive, metavar="D")


class BAM(Attention):
    """Bottleneck attention module (Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module",
    BMVC 2018).

    ``A(F) = F + F * sigmoid(Mc(F) + Ms(F))`` (eqs. 1-2), the two branches broadcast to C x H x W:

    * ``Mc(F) = BN(W1 relu(W0 AvgPool(F) + b0) + b1)`` (eq. 3), ``W0: C -> C/r``, ``W1: C/r -> C``;
    * ``Ms(F) = BN(f3_1x1(f2_3x3(f1_3x3(f0_1x1(F)))))`` (eq. 4): ``C -> C/r``, two 3x3
      convolutions with dilation d, ``C/r -> 1``.

    r = 16, d = 4 (the paper's). The paper is silent about the layers inside the spatial branch;
    as in the authors' code each of its first three convolutions is followed by BatchNorm and a
    ReLU, and every linear layer and convolution has a bias. The authors' code combines the
    branches by a product and leaves out the two output BatchNorms; this module follows the
    paper's equations. Like any batch-norm branch over a pooled vector, ``Mc`` needs more than
    one sample per batch in training. 1-D and 3-D maps use 1-D / 3-D convolutions.
    """

    name = "bam"
    Config = BAMConfig

    def __init__(self, channels: int, dims: int = 2, **options: Any) -> None:
        super().__init__(channels, dims, **options)
        cfg: BAMConfig = self.config  # type: ignore[assignment]
        hidden = hidden_width(channels, cfg.reduction)
        conv, norm = _CONVS[self.dims], _NORMS[self.dims]
        self.channel_fc0 = nn.Linear(channels, hidden)
        self.channel_fc1 = nn.Linear(hidden, channels)
        self.channel_bn = nn.BatchNorm1d(channels)
        d = cfg.dilation
        self.spatial = nn.Sequential(
            conv(channels, hidden, 1), norm(hidden), nn.ReLU(),
            conv(hidden, hidden, 3, padding=d, dilation=d), norm(hidden), nn.ReLU(),
            conv(hidden, hidden, 3, padding=d, dilation=d), norm(hidden), nn.ReLU(),
            conv(hidden, 1, 1), norm(1),
        )  # fmt: skip

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        mc = self.channel_bn(self.channel_fc1(torch.relu(self.channel_fc0(x.mean(_spatial(x))))))
        ms = self.spatial(x)
        return torch.addcmul(x, x, torch.sigmoid(_as_map(mc, self.dims) + ms))  # F + F * sigma(.), one pass


# ----------------------------------------------------------------------------- GAM


@dataclass(frozen=True)
class GAMConfig(ModuleConfig):
    module: ClassVar[str] = "gam"
    rate: int = option(4, "GAM: reduction rate r of both submodules, width max(1, C // r)", check=positive, metavar="R")
    kernel_size: int = option(7, "CBAM/GAM/triplet: odd spatial kernel", check=odd, metavar="K")
    groups: int = option(
        1, "GAM: groups of the spatial convolutions, channels shuffled between them (the paper's ResNet-50 variant)",
        check=positive, metavar="G",
    )  # fmt: skip


class GAM(Attention):
    """Global attention mechanism (Liu, Shao, Hoffmann, "Global Attention Mechanism: Retain
    Information to Enhance Channel-Spatial Interactions", arXiv:2112.05561, 2021).

    ``F2 = Mc(F1) * F1``, ``A(F1) = Ms(F2) * F2`` (eq. 1). The channel submodule keeps the full
    map: a two-layer MLP ``C -> C/r -> C`` with a ReLU applied at every position (the
    "permutation, MLP, reverse permutation" of Fig. 2; written here as 1x1 convolutions, the
    same maths without the permutes), then a sigmoid. The spatial submodule: a kxk convolution
    ``C -> C/r``, BatchNorm, ReLU, a kxk convolution ``C/r -> C``, BatchNorm, sigmoid. r = 4,
    k = 7 (the paper's). The paper has no released code and is silent about biases; the
    linear layers and convolutions here have them (PyTorch's default). Parameters:
    ``2*C*(C/r) + C/r + C`` (channel) ``+ 2*k^d*C*(C/r) + 3*(C/r) + 3*C`` (spatial).

    ``groups=g`` (default 1, the definition above): the paper's ResNet-50 uses "group convolution
    with channel shuffle" in the spatial submodule to keep the parameter count down, without giving
    g or where the shuffle sits. Here both kxk convolutions have g groups and the hidden map is
    shuffled between them (ShuffleNet's channel shuffle, so each output group sees every input
    group); the spatial weights shrink to ``2*k^d*C*(C/r)/g``. g must divide C and C/r (a site
    where it does not is skipped with that reason).
    """

    name = "gam"
    Config = GAMConfig

    def __init__(self, channels: int, dims: int = 2, **options: Any) -> None:
        super().__init__(channels, dims, **options)
        cfg: GAMConfig = self.config  # type: ignore[assignment]
        hidden = hidden_width(channels, cfg.rate)
        conv, norm = _CONVS[self.dims], _NORMS[self.dims]
        k = cfg.kernel_size
        self.channel_fc1 = conv(channels, hidden, 1)
        self.channel_fc2 = conv(hidden, channels, 1)
        g = cfg.groups
        self.groups = g
        self.spatial = nn.Sequential(
            conv(channels, hidden, k, padding=k // 2, groups=g), norm(hidden), nn.ReLU(),
            conv(hidden, channels, k, padding=k // 2, groups=g), norm(channels),
        )  # fmt: skip

    @classmethod
    def channel_refusal(cls, channels: int, config: ModuleConfig) -> str | None:
        g = config.groups  # type: ignore[attr-defined]
        hidden = hidden_width(channels, config.rate)  # type: ignore[attr-defined]
        if channels % g or hidden % g:
            return f"gam --groups {g} must divide the channels ({channels}) and the hidden width C // r ({hidden})"
        return None

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        f2 = x * torch.sigmoid(self.channel_fc2(torch.relu(self.channel_fc1(x))))
        sp = self.spatial
        h = sp[2](sp[1](sp[0](f2)))
        if self.groups > 1:
            h = F.channel_shuffle(h, self.groups)
        return f2 * torch.sigmoid(sp[4](sp[3](h)))


# ----------------------------------------------------------------------------- triplet attention


@dataclass(frozen=True)
class TripletConfig(ModuleConfig):
    module: ClassVar[str] = "triplet"
    kernel_size: int = option(7, "CBAM/GAM/triplet: odd spatial kernel", check=odd, metavar="K")


class _ZPoolGate(nn.Module):
    """One branch's gate: a kxk convolution (2 -> 1, no bias), BatchNorm and sigmoid of a Z-pool."""

    def __init__(self, kernel_size: int, dims: int) -> None:
        super().__init__()
        self.conv = _CONVS[dims](2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = _NORMS[dims](1, eps=1e-5, momentum=0.01)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(z)))


class TripletAttention(Attention):
    """Triplet attention (Misra, Nalamada, Arasanipalai, Hou, "Rotate to Attend: Convolutional
    Triplet Attention Module", WACV 2021).

    Three branches, each a rotation of F that puts one axis in the channel position, a gate, and
    the inverse rotation: the (C, W) branch pools over H, the (H, C) branch over W, the (H, W)
    branch over C. A gate is ``x * sigmoid(BN(conv_kxk(Z-pool(x))))`` with
    ``Z-pool(x) = [max_0(x) ; mean_0(x)]`` (eq. 1), a 2 -> 1 convolution without bias, k = 7.
    ``A(F) = (y1 + y2 + y3) / 3`` (eq. 2). The rotations (``x.transpose(1, a)``, a = 2, 3, then
    the identity), the [max ; mean] order and the BatchNorm's momentum 0.01 are the authors'
    code's. Parameters: ``3 * (2*k*k + 2)``.

    Computed without rotating F: a branch's Z-pool of the rotated map is F's pool over that axis,
    rotated (a 2-channel map), and its gate goes back to F's layout with size 1 on the pooled
    axis, so ``A(F) = F * (s1 + s2 + s3) / 3`` reads F once instead of copying it per branch.

    1-D and 3-D maps: the same rule with one branch per axis, d + 1 in all (the channel axis
    swapped with each spatial axis, then the plain channel pool), averaged.
    """

    name = "triplet"
    Config = TripletConfig

    def __init__(self, channels: int, dims: int = 2, **options: Any) -> None:
        super().__init__(channels, dims, **options)
        k = self.config.kernel_size  # type: ignore[attr-defined]
        self.gates = nn.ModuleList(_ZPoolGate(k, self.dims) for _ in range(self.dims + 1))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        # Branch a's rotation x.transpose(1, a) followed by the Z-pool over its dim 1 is the pool of x
        # over axis a, transposed: only the pooled (2-channel) map is rotated, never x. Each gate is
        # rotated back to x's layout as a broadcastable map (size 1 on the pooled axis), so
        # (x*s1 + x*s2 + x*s3) / 3 = x * (s1/3 + s2/3 + s3/3) touches x once.
        third = 1.0 / float(self.dims + 1)
        total = x  # replaced by the first gate (TorchScript wants a typed start)
        for i, gate in enumerate(self.gates):
            a = i + 2 if i < self.dims else 1
            z = torch.cat([x.amax(a, keepdim=True), x.mean(a, keepdim=True)], dim=a)
            s = gate(z.transpose(1, a)).transpose(1, a) * third
            total = s if i == 0 else total + s
        return x * total


# ----------------------------------------------------------------------------- CBAM and the registry


@dataclass(frozen=True)
class UserConfig(ModuleConfig):
    module: ClassVar[str] = "user"


ATTENTION: dict[str, type[nn.Module]] = {
    "cbam": CBAM,
    "se": SE,
    "eca": ECA,
    "coord": CoordAttention,
    "simam": SimAM,
    "bam": BAM,
    "gam": GAM,
    "triplet": TripletAttention,
}
"""The built-in attention modules by name; each is ``cls(channels, dims=d, **options)``."""

_CONFIGS: dict[str, type[ModuleConfig]] = {
    "cbam": CBAMConfig, "se": SEConfig, "eca": ECAConfig, "coord": CoordConfig, "simam": SimAMConfig,
    "bam": BAMConfig, "gam": GAMConfig, "triplet": TripletConfig,
}  # fmt: skip
_RANKS = {"cbam": (1, 2, 3)}


def config_of(name: str) -> type[ModuleConfig]:
    """The options declaration of the built-in module ``name``."""
    return _CONFIGS[name]


def ranks_of(name: str) -> tuple[int, ...]:
    cls = ATTENTION[name]
    return _RANKS.get(name) or cls.ranks  # type: ignore[attr-defined]


def rank_refusal(name: str, dims: int) -> str | None:
    """Why module ``name`` cannot refine a map with ``dims`` spatial axes, or None when it can."""
    if name not in ATTENTION or dims in ranks_of(name):
        return None
    cls = ATTENTION[name]
    return cls.refusal(dims) if hasattr(cls, "refusal") else f"{name} handles 1-D, 2-D and 3-D maps"


# ----------------------------------------------------------------------------- the user's own class


class UserAttention(Attention):
    """The user's own attention module, built by ``factory(channels)`` or
    ``factory(channels, dims=d)`` when the factory accepts ``dims``, inside a wrapper that adds
    the identity gate and records where the class came from (``target``, ``"pkg.mod:Class"``)."""

    name = "user"
    Config = UserConfig

    def __init__(self, channels: int, dims: int = 2, *, factory: Callable[..., nn.Module], target: str,
                 factory_options: dict[str, Any] | None = None, **options: Any) -> None:  # fmt: skip
        super().__init__(channels, dims, **options)
        kwargs = dict(factory_options or {})
        if _accepts(factory, "dims"):
            kwargs["dims"] = dims
        try:
            inner = factory(channels, **kwargs)
        except Exception as exc:
            raise ValueError(
                f"{target}({channels}{', ...' if kwargs else ''}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(inner, nn.Module):
            raise ValueError(f"{target}({channels}) returned a {type(inner).__name__}, not a torch.nn.Module")  # noqa: TRY004
        self.inner = inner
        self.target = target

    def extra_repr(self) -> str:
        return f"{self.target}, channels={self.channels}, dims={self.dims}"

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def is_user_path(name: str) -> bool:
    """``"pkg.mod:Class"`` (an import path) rather than a registry name."""
    return isinstance(name, str) and ":" in name


def resolve_module(path: str) -> Callable[..., nn.Module]:
    """Import ``"pkg.mod:Class"`` (or ``"pkg.mod:factory"``, a dotted attribute after the colon
    too) and return the class or factory; ``ValueError`` with one line when it does not exist."""
    mod, _, attr = path.partition(":")
    if not mod or not attr or not all(p.isidentifier() for p in mod.split(".") + attr.split(".")):
        raise ValueError(f"module {path!r}: expected a registry name ({', '.join(ATTENTION)}) or pkg.mod:Class")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as exc:
        raise ValueError(f"module {path!r}: cannot import {mod} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {path!r}: {mod} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"module {path!r}: {attr} is a {type(obj).__name__}, not a class or factory")  # noqa: TRY004
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ValueError(f"module {path!r}: {attr} is not a torch.nn.Module class")  # noqa: TRY004
    return obj


def is_attention(module: object) -> bool:
    """Whether ``module`` is one of the attention modules this tool inserts (any kind)."""
    return isinstance(module, (CBAM, Attention))


# ----------------------------------------------------------------------------- what insert_attention builds


@dataclass(frozen=True)
class ModuleChoice:
    """One ``module=`` choice, checked: how to build it at a site and how a recipe records it.

    ``key`` is the registry name or the import path (``"pkg.mod:Class"``); ``options`` the
    validated options in their JSON form (what the recipe stores); ``prefix`` starts the inserted
    modules' names (``layer1.0.se_add``).
    """

    key: str
    options: dict[str, Any]
    prefix: str
    build: Callable[[int, int], nn.Module]
    refusal: Callable[[int, int], str | None]  # (channels, spatial dims) -> why the site is skipped, or None
    user: bool = False


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def choose(module: Any, options: dict[str, Any], *, trust: bool = True) -> ModuleChoice:
    """Check ``module`` (a registry name, ``"pkg.mod:Class"``, or a class / factory) and its
    ``options``; ``ValueError`` with one line when something is wrong.

    A user class named by an import path is imported only with ``trust`` (a recipe read from a
    file names it, and building it runs its code).
    """
    if isinstance(module, str) and module in ATTENTION:
        config = _CONFIGS[module]
        cfg = config.from_options(options)  # validates every option once
        cls = ATTENTION[module]
        normalized = {k: getattr(cfg, k) for k in options}

        def build(channels: int, dims: int) -> nn.Module:
            return cls(channels, dims=dims, **normalized)

        def refusal(channels: int, dims: int) -> str | None:
            by_channels = getattr(cls, "channel_refusal", None)
            return rank_refusal(module, dims) or (by_channels(channels, cfg) if by_channels is not None else None)

        return ModuleChoice(module, {k: _json(v) for k, v in normalized.items()}, module, build, refusal)
    if isinstance(module, str) and is_user_path(module):
        if not trust:
            raise ValueError(
                f"the recipe builds the user class {module}, and building it runs that code; "
                "load with trust=True (--trust) if you trust the file"
            )
        factory = resolve_module(module)
        target = module
    elif isinstance(module, str):
        raise ValueError(f"unknown attention module {module!r}; choose one of {', '.join(ATTENTION)} or pkg.mod:Class")
    elif callable(module):
        factory = module
        qual = getattr(module, "__qualname__", type(module).__name__)
        target = f"{getattr(module, '__module__', '?')}:{qual}"
        if "<locals>" in qual or "<lambda>" in qual:
            target = f"{target} (not importable: a recipe with it cannot be replayed from a file)"
    else:
        raise ValueError(f"module must be a name ({', '.join(ATTENTION)}), pkg.mod:Class or a class, got {module!r}")
    init = options.get("init", "default")
    UserConfig(init=init)  # validates init
    factory_options = {k: v for k, v in options.items() if k != "init"}

    def build_user(channels: int, dims: int) -> nn.Module:
        return UserAttention(channels, dims, factory=factory, target=target, factory_options=factory_options, init=init)

    return ModuleChoice(target, {k: _json(v) for k, v in options.items()}, "attn", build_user, lambda c, d: None, True)


def check_keeps_shape(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype | None, where: str) -> None:
    """Run a user module once on a random map of ``shape``; ``ValueError`` unless it returns a
    tensor of that shape."""
    was = module.training
    module.eval()
    x = torch.rand(*shape, dtype=dtype or torch.float32, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:
        raise ValueError(f"{module.target if hasattr(module, 'target') else type(module).__name__} fails on "
                         f"the {list(shape)} map at {where}: {type(exc).__name__}: {exc}") from exc  # fmt: skip
    finally:
        module.train(was)
    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != list(shape):
        name = getattr(module, "target", type(module).__name__)
        raise ValueError(
            f"{name} at {where} returns {got} for a {list(shape)} map; an attention module must keep the shape"
        )
