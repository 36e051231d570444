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
    >>> cbam = CBAM(64)                         # the seed's module: r=16, k=7, no biases
    >>> cbam(torch.randn(2, 64, 28, 28)).shape
    torch.Size([2, 64, 28, 28])
    >>> sum(p.numel() for p in cbam.parameters()) == 2 * 64 * 4 + 2 * 7 * 7
    True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["CBAM", "INITS", "ORDERS", "POOL_TYPES", "VARIANTS", "ChannelAttention", "SpatialAttention"]

POOL_TYPES = ("avg", "max", "lp", "lse")
ORDERS = ("channel_first", "spatial_first", "parallel")
VARIANTS = ("seed", "official")
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
                if torch.jit.is_scripting():
                    pooled.append(x.amax(dim=dims))
                else:
                    pooled.append(_spatial_max_eager(x))
            elif p == "lp":
                pooled.append(torch.linalg.vector_norm(x, ord=2, dim=dims))
            else:
                pooled.append(torch.logsumexp(x, dim=dims))
        return torch.stack(pooled, dim=0)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid channel scores (N, C) from the stacked descriptors: one MLP call for all."""
        if not torch.jit.is_scripting():  # noqa: SIM102  (TorchScript drops only this exact test)
            if _native_ok(pooled, pooled.shape[0] * pooled.shape[1], 4):
                return _mlp_native(self.fc1, self.fc2, pooled)
        return self.fc2(F.relu(self.fc1(pooled))).sum(dim=0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid channel scores, (N, C)."""
        return self.head(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class SpatialAttention(nn.Module):
    """Spatial gate ``Ms(F) = sigmoid(conv([mean_c F ; max_c F]))``, returned as (N, 1, *spatial).

    A 2-in, 1-out convolution with an odd ``kernel_size`` and padding ``kernel_size // 2`` keeps
    the map's size. ``order="mean_max"`` is the seed's input order; the authors' code stacks
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

    def head(self, pooled: torch.Tensor, native_positions: int | None = None) -> torch.Tensor:
        """Pre-sigmoid map (N, 1, *spatial) from the pooled 2-channel input. ``native_positions``:
        up to how many positions (batch x map) an eager CPU call may use PyTorch's native kernel."""
        if torch.jit.is_scripting():
            out = self.conv(pooled)
        else:
            out = _small_conv_eager(self.conv, pooled, native_positions)
        if self.norm is not None:
            out = self.norm(out)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid spatial map, (N, 1, *spatial)."""
        return self.head(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


# positions (batch x map) up to which PyTorch's native kernel beats oneDNN's for the 2-in 1-out conv;
# above, its im2col buffer (k*k*2 floats a position) costs page faults on a busy machine. Without
# autograd the bar is higher (measured: 1x2x56x56 34 vs 58 us warm, 69 vs 130 us with the caches full
# of other data; equal at 6272 positions); in training a 4x28x28 map was 13 % slower fwd+bwd natively
_NATIVE_CONV_POSITIONS = 1024
_NATIVE_CONV_POSITIONS_INFERENCE = 4096


@torch.jit.unused
def _inference_conv_positions() -> int:
    return _NATIVE_CONV_POSITIONS_INFERENCE


@torch.jit.unused
def _small_conv_eager(conv: nn.Module, x: torch.Tensor, limit: int | None = None) -> torch.Tensor:
    """``conv(x)`` for the spatial gate; on CPU, small maps go to PyTorch's own convolution.

    oneDNN, which ``F.conv2d`` picks on CPU, has a fixed cost of some 25 us a call, several times
    the arithmetic of a 2-in 1-out k x k convolution on a 28x28 map; the native kernel
    (im2col + gemm) has not. Same maths, differentiable.
    """
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if (
        type(conv) is not nn.Conv2d  # measured: the native 3-D kernel is slower than oneDNN's
        or conv.padding_mode != "zeros"
        or not _native_ok(x, x.shape[0] * _plane(x), _NATIVE_CONV_POSITIONS if limit is None else limit, with_grad=True)
    ):
        return conv(x)
    # a 2-channel map made from a channels-last feature map is channels-last too; the native
    # kernel wants NCHW, and the copy is two channels
    return torch._C._nn.thnn_conv2d(
        x.contiguous(), conv.weight, list(conv.kernel_size), conv.bias, list(conv.stride), list(conv.padding)
    )


@torch.jit.unused
def _native_ok(x: torch.Tensor, count: int, limit: int, with_grad: bool = False) -> bool:
    """Whether to call one of PyTorch's native CPU kernels directly: eager mode, CPU, float32/64,
    ``count <= limit``, no autograd unless ``with_grad``, and no dispatch mode watching (FLOP
    counters and the like know ``aten.convolution`` and ``aten.mm``, not the native kernels)."""
    return (
        count <= limit
        and x.device.type == "cpu"
        and (with_grad or not torch.is_grad_enabled())
        and type(x) is torch.Tensor
        and x.dtype in (torch.float32, torch.float64)
        and not _tracing()
        and _get_current_dispatch_mode() is None
    )


@torch.jit.unused
def _mlp_native(fc1: nn.Linear, fc2: nn.Linear, pooled: torch.Tensor) -> torch.Tensor:
    """``sum_p fc2(relu(fc1(pooled[p])))`` for a few descriptors, each layer as a 1x1 convolution on
    PyTorch's native kernel: one matrix-vector product per descriptor, spread over the intra-op
    threads (a matrix product with 2 rows runs on one). The same products and sums as ``F.linear``."""
    p, n, c = pooled.shape
    hidden = fc1.weight.shape[0]
    h = torch._C._nn.thnn_conv2d(
        pooled.reshape(p * n, c, 1, 1), fc1.weight.view(hidden, c, 1, 1), [1, 1], fc1.bias, [1, 1], [0, 0]
    )
    out = torch._C._nn.thnn_conv2d(torch.relu_(h), fc2.weight.view(c, hidden, 1, 1), [1, 1], fc2.bias, [1, 1], [0, 0])
    return out.view(p, n, c).sum(dim=0)


def _channel_weighted_sum(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_c a[n, c] * t[n, c, ...]`` as (N, 1, *spatial), one pass over ``t``."""
    n, c = t.shape[0], t.shape[1]
    if t.is_contiguous():
        out = torch.bmm(a.unsqueeze(1), t.view(n, c, _plane(t)))
        return out.view([n, 1] + list(t.shape[2:]))
    return (t * a.view([n, c] + [1] * (t.dim() - 2))).sum(dim=1, keepdim=True)


def _tracing() -> bool:
    """True under tracing, torch.compile and export, where plain ops give the cleanest graph."""
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
    )


@torch.jit.unused
def _channel_max_eager(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(dim=1, keepdim=True)``, folded with elementwise maxima when maps are small.

    The max-reduction kernel works along the contiguous spatial positions; for small maps with
    an odd number of positions (7x7) that is several times slower than halving the channels
    with ``torch.maximum``, which gives bit-identical results (a max is exact).
    """
    if _no_folding(x) or x.shape[1] < 16 or not _odd_small(_plane(x)):
        return x.amax(dim=1, keepdim=True)
    return _fold_max(x, 1).amax(dim=1, keepdim=True)


@torch.jit.unused
def _spatial_max_eager(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(dim=spatial dims)``, (N, C), by the same folding when maps are small."""
    size = _plane(x)
    if _no_folding(x) or not _odd_small(size) or x.shape[0] * x.shape[1] < _SPATIAL_FOLD_ROWS:
        return x.amax(dim=_spatial_dims(x))
    return _fold_max(x.view(x.shape[0], x.shape[1], size), 2).amax(dim=2)


# measured: below some 8k (sample, channel) rows the fold's extra launches cost more than they save
_SPATIAL_FOLD_ROWS = 8192


def _plane(x: torch.Tensor) -> int:
    """Positions in one (sample, channel) map; defined for an empty batch too."""
    size = 1
    for d in x.shape[2:]:
        size *= int(d)
    return size


def _odd_small(size: int) -> bool:
    # measured: the max kernel is slow for an odd number of contiguous positions (5x5, 7x7, 9x9)
    return 16 < size < 256 and size % 2 == 1


def _no_folding(x: torch.Tensor) -> bool:
    # amax's own backward splits a tied maximum evenly; a graph through folds would not.
    # The folds were measured on CPUs; on a GPU each is one more kernel launch.
    return (
        _tracing() or x.device.type != "cpu" or not x.is_contiguous() or (torch.is_grad_enabled() and x.requires_grad)
    )


def _fold_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Halve ``dim`` with ``torch.maximum`` until at most 8 remain; the max over it is kept."""
    while x.shape[dim] > 8:
        size = x.shape[dim]
        half = (size + 1) // 2  # for an odd size the middle entry is in both halves
        x = torch.maximum(x.narrow(dim, 0, half), x.narrow(dim, size - half, half))
    return x


# F' is reduced over channels block by block while the block is still in cache
_BLOCK_BYTES = 1 << 21


def _sample_step(x: torch.Tensor) -> int:
    """Samples per block so that a block of ``x`` is about ``_BLOCK_BYTES``; all of them for a small
    or non-contiguous ``x`` or off the CPU (on a GPU a block would be one more kernel launch)."""
    n = x.shape[0]
    sample = x[0].numel() * x.element_size() if n else 0
    if n * sample <= 4 * _BLOCK_BYTES or not x.is_contiguous() or x.device.type != "cpu":
        return max(1, n)
    return max(1, _BLOCK_BYTES // sample)


@torch.jit.unused
def _mean_and_max_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spatial mean and max of each channel, (N, C) each, a block of samples at a time so that
    the max reads the block from cache."""
    n = x.shape[0]
    step = _sample_step(x)
    if step >= n:
        return x.mean(dim=_spatial_dims(x)), _spatial_max_eager(x)
    avg = x.new_empty(x.shape[:2])
    mx = x.new_empty(x.shape[:2])
    for i in range(0, n, step):
        block = x[i : i + step]
        torch.mean(block, dim=_spatial_dims(x), out=avg[i : i + step])
        mx[i : i + step] = _spatial_max_eager(block)
    return avg, mx


@torch.jit.unused
def _refine_and_pool_eager(
    x: torch.Tensor, a: torch.Tensor, reuse: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F' = x * a`` (a new tensor, or ``x`` itself scaled in place when ``reuse``) with its
    channel mean and max, each (N, 1, *spatial).

    Without autograd, F' is written and reduced a block of samples at a time, so the two
    reductions read it from cache rather than from memory; the values are those of
    ``refined.mean(1)`` and ``refined.amax(1)``.
    """
    n = x.shape[0]
    step = _sample_step(x)  # all of them off the CPU or for a strided x
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad)
    if step >= n or needs_graph or _tracing():
        refined = x.mul_(a) if reuse and not needs_graph else x * a
        return refined, refined.mean(dim=1, keepdim=True), _channel_max_eager(refined)
    refined = x if reuse else torch.empty_like(x)
    pooled_shape = [n, 1] + list(x.shape[2:])
    mean = x.new_empty(pooled_shape)
    smax = x.new_empty(pooled_shape)
    for i in range(0, n, step):
        block = torch.mul(x[i : i + step], a[i : i + step], out=refined[i : i + step])
        torch.mean(block, dim=1, keepdim=True, out=mean[i : i + step])
        smax[i : i + step] = _channel_max_eager(block)
    return refined, mean, smax


def _spatial_weighted_sum(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_p t[n, c, p] * w[n, 0, p]`` as (N, C), one pass over ``t``; ``w`` is (N, 1, *spatial)."""
    n, c = t.shape[0], t.shape[1]
    if t.is_contiguous():
        return torch.bmm(w.reshape(n, 1, _plane(t)), t.view(n, c, _plane(t)).transpose(1, 2)).view(n, c)
    return (t * w).sum(dim=_spatial_dims(t))


# scratch size for the spatial-max gradient, which is added a block of rows at a time
_SCRATCH_BYTES = 1 << 20


def _add_max_grad(out: torch.Tensor, x: torch.Tensor, mx: torch.Tensor, g: torch.Tensor) -> None:
    """``out += (x == mx) * g / ties`` with ``mx``, ``g`` of shape (N, C, 1, ...) and ties counted
    per (n, c): amax's gradient. Rows are done in blocks through a small scratch buffer, so the
    backward allocates no second full-size tensor."""
    n, c = x.shape[0], x.shape[1]
    if not (x.is_contiguous() and out.is_contiguous()):
        hit = torch.eq(x, mx).to(x.dtype)
        out.addcmul_(hit, g / hit.sum(dim=_spatial_dims(x), keepdim=True))
        return
    rows, size = n * c, _plane(x)
    xv, ov, mv, gv = x.view(rows, size), out.view(rows, size), mx.reshape(rows, 1), g.reshape(rows, 1)
    step = max(1, _SCRATCH_BYTES // (size * x.element_size()))
    scratch = x.new_empty(min(step, rows), size)
    for r in range(0, rows, step):
        e = min(rows, r + step)
        hit = torch.eq(xv[r:e], mv[r:e], out=scratch[: e - r])
        ov[r:e].addcmul_(hit, gv[r:e] / hit.sum(dim=1, keepdim=True))


class _CBAMFunction(torch.autograd.Function):
    """Channel-then-spatial CBAM with avg+max channel pooling, for training in eager mode.

    Autograd on the plain formulation keeps F' and several full-size temporaries alive until
    backward. This function keeps only the input and per-sample vectors and maps (the channel
    gate, the spatial gate, the two max descriptors); forward makes one full-size tensor (the
    output) and backward one (the input's gradient, used as scratch on the way), recomputing
    ``F' = Mc * F`` where it needs it. The sums over positions and over channels that the
    gradient needs are batched matrix-vector products. The small parts (MLP, spatial conv,
    norm, sigmoids) run through ordinary autograd on their own little graph, built in forward
    from detached descriptors, so batch-norm statistics are updated exactly once. Not twice
    differentiable.

    The maths is the plain path's, ties included: a max shares its gradient equally among
    tied positions, as ``amax`` does.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: CBAM, *params: torch.Tensor) -> torch.Tensor:
        cg, sg = module.channel_gate, module.spatial_gate
        assert cg is not None and sg is not None
        n, c = x.shape[0], x.shape[1]
        sdims = _spatial_dims(x)
        avg, cmax = _mean_and_max_eager(x)
        avg_first = cg.pool_types[0] == "avg"
        pooled_c = torch.stack([avg, cmax] if avg_first else [cmax, avg], dim=0)
        # the small parts: by hand for the seed's layers, else on a little autograd graph
        manual = _manual_small_parts(cg, sg)
        if manual:
            hidden = F.relu(F.linear(pooled_c, cg.fc1.weight, cg.fc1.bias))
            gate_c = torch.sigmoid(F.linear(hidden, cg.fc2.weight, cg.fc2.bias).sum(dim=0))
        else:
            with torch.enable_grad():
                pooled_c.requires_grad_()
                gate_c = torch.sigmoid(cg.head(pooled_c))
        a = gate_c.detach()
        refined, mean, smax = _refine_and_pool_eager(x, a.view([n, c] + [1] * len(sdims)))
        pooled_s = sg.stack(mean, smax)
        if manual:
            gate_s = torch.sigmoid(sg.head(pooled_s))
        else:
            with torch.enable_grad():
                pooled_s.requires_grad_()
                gate_s = torch.sigmoid(sg.head(pooled_s))
        ms = gate_s.detach()
        out = refined.mul_(ms)
        ctx.save_for_backward(x, a, ms, smax, cmax)
        ctx.small = (pooled_c, hidden if manual else gate_c, pooled_s, gate_s, avg_first, sg.max_first)
        # the tensors the layers hold now (torch.func.functional_call swaps them only for the call)
        ctx.manual = sg.conv if manual else None
        if manual:
            ctx.params_c = [cg.fc1.weight, cg.fc1.bias, cg.fc2.weight, cg.fc2.bias]
            ctx.params_s = [sg.conv.weight, sg.conv.bias]
        else:
            ctx.params_c = [p for p in cg.parameters() if p.requires_grad]
            ctx.params_s = [p for p in sg.parameters() if p.requires_grad]
        ctx.param_ids = [id(p) for p in params]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, ms, smax, cmax = ctx.saved_tensors
        pooled_c, gate_c, pooled_s, gate_s, avg_first, max_first = ctx.small
        n, c = x.shape[0], x.shape[1]
        bshape = [n, c] + [1] * (x.dim() - 2)
        a_b = a.view(bshape)
        grad = grad.contiguous(memory_format=_memory_format(x))
        # three passes over (grad, x), each a block of samples at a time so that the several
        # reductions of a pass read the block from cache; one block when x is small or strided
        step = _sample_step(x) if grad.is_contiguous() else n
        blocks = [(i, min(n, i + step)) for i in range(0, n, step)]
        buf = torch.empty_like(x[:step]) if len(blocks) > 1 else torch.empty_like(x)

        # pass 1: dL/dMs = sum_c grad * F', and the grad * Ms part of dL/dMc = sum_p dL/dF' * F
        if len(blocks) == 1:
            grad_ms, grad_a = _backward_pass1(grad, x, a, ms, buf)
        else:
            grad_ms, grad_a = ms.new_empty(ms.shape), a.new_empty(a.shape)
            for i, j in blocks:
                grad_ms[i:j], grad_a[i:j] = _backward_pass1(grad[i:j], x[i:j], a[i:j], ms[i:j], buf[: j - i])
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # its backward of a 2-in 1-out conv is 2-5x slower here
        try:
            if ctx.manual is not None:
                grads_s = _spatial_conv_backward(ctx.manual, ctx.params_s, pooled_s, ms, grad_ms)
            else:
                grads_s = torch.autograd.grad(
                    gate_s, [pooled_s] + ctx.params_s, grad_ms, retain_graph=True, allow_unused=True
                )
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        g_mean, g_max = grads_s[0].unsqueeze(2).unbind(1)
        if max_first:
            g_mean, g_max = g_max, g_mean
        g_mean = g_mean / c

        # pass 2: the channel max's indicator and tie-shared gradient, the rest of dL/dMc
        if len(blocks) == 1:
            coef, grad_a2 = _backward_pass2(x, a, smax, g_mean, g_max, buf)
            grad_a += grad_a2
        else:
            coef = torch.empty_like(g_max)
            for i, j in blocks:
                coef[i:j], grad_a2 = _backward_pass2(x[i:j], a[i:j], smax[i:j], g_mean[i:j], g_max[i:j], buf[: j - i])
                grad_a[i:j] += grad_a2
        if ctx.manual is not None:
            grads_c = _channel_mlp_backward(ctx.params_c, pooled_c, gate_c, a, grad_a)
        else:
            grads_c = torch.autograd.grad(
                gate_c, [pooled_c] + ctx.params_c, grad_a, retain_graph=True, allow_unused=True
            )

        grad_x = None
        if ctx.needs_input_grad[0]:
            g_avg, g_cmax = grads_c[0].unbind(0)
            if not avg_first:
                g_avg, g_cmax = g_cmax, g_avg
            g_avg = (g_avg / _plane(x)).view(bshape)
            g_cmax = g_cmax.view(bshape)
            cmax_b = cmax.view(bshape)
            if len(blocks) == 1:  # the indicator is still in ``buf``, which becomes dL/dF
                grad_x = _backward_pass3(buf, False, grad, x, a_b, ms, smax, g_mean, coef, g_avg, cmax_b, g_cmax)
            else:
                grad_x = torch.empty_like(x)
                for i, j in blocks:
                    args = (grad, x, a_b, ms, smax, g_mean, coef, g_avg, cmax_b, g_cmax)
                    _backward_pass3(grad_x[i:j], True, *(t[i:j] for t in args))

        by_id = {id(p): g for p, g in zip(ctx.params_c, grads_c[1:]) if p is not None and p.requires_grad}
        by_id.update({id(p): g for p, g in zip(ctx.params_s, grads_s[1:]) if p is not None and p.requires_grad})
        return (grad_x, None) + tuple(by_id.get(i) for i in ctx.param_ids)


def _manual_small_parts(cg: nn.Module, sg: nn.Module) -> bool:
    """Whether the training function may run the channel MLP and the spatial conv by hand: the
    seed's layers (two ``nn.Linear``, a zero-padded conv, no norm) with no hooks on them."""
    assert isinstance(cg, ChannelAttention) and isinstance(sg, SpatialAttention)
    layers = (cg.fc1, cg.fc2, sg.conv)
    return (
        type(cg.fc1) is nn.Linear
        and type(cg.fc2) is nn.Linear
        and type(sg.conv) in _CONVS.values()
        and sg.norm is None
        and sg.conv.padding_mode == "zeros"
        and not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in layers)
    )


def _channel_mlp_backward(
    params: list[torch.Tensor | None],
    pooled: torch.Tensor,
    hidden: torch.Tensor,
    gate: torch.Tensor,
    grad_gate: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``gate = sigmoid(sum_p fc2(relu(fc1(pooled[p]))))``, ``params`` being fc1's and
    fc2's (weight, bias): for the stacked descriptors (P, N, C) and for each parameter (None for a
    missing bias)."""
    w1, b1, w2, b2 = params
    assert w1 is not None and w2 is not None
    dz = grad_gate * gate * (1 - gate)  # (N, C), the same for every descriptor's fc2 output
    d_hidden = torch.matmul(dz, w2).unsqueeze(0) * (hidden > 0)  # (P, N, hidden)
    flat = d_hidden.reshape(-1, d_hidden.shape[-1])
    g_w1 = flat.t().mm(pooled.reshape(-1, pooled.shape[-1]))
    g_b1 = flat.sum(dim=0) if b1 is not None else None
    g_w2 = dz.t().mm(hidden.sum(dim=0))
    g_b2 = dz.sum(dim=0) * pooled.shape[0] if b2 is not None else None
    return torch.matmul(d_hidden, w1), g_w1, g_b1, g_w2, g_b2


def _spatial_conv_backward(
    conv: nn.Module,
    params: list[torch.Tensor | None],
    pooled: torch.Tensor,
    gate: torch.Tensor,
    grad_gate: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``gate = sigmoid(conv(pooled))`` for the pooled map and the conv's (weight,
    bias) ``params``, by ATen's convolution backward (what autograd would call)."""
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    dz = grad_gate * gate * (1 - gate)
    weight, bias = params
    assert weight is not None
    dims = weight.dim() - 2
    return torch.ops.aten.convolution_backward(
        dz,
        pooled,
        weight,
        [weight.shape[0]] if bias is not None else None,
        list(conv.stride),
        list(conv.padding),
        list(conv.dilation),
        False,
        [0] * dims,
        conv.groups,
        [True, weight.requires_grad, bias is not None and bias.requires_grad],
    )


def _backward_pass1(
    grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, ms: torch.Tensor, buf: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_c grad * F', sum_p grad * Ms * F)``: the spatial gate's gradient and the first part of
    the channel gate's, for a block of samples (``buf`` is scratch of the block's size)."""
    gx = torch.mul(grad, x, out=buf)
    return _channel_weighted_sum(gx, a), _spatial_weighted_sum(gx, ms)


def _backward_pass2(
    x: torch.Tensor, a: torch.Tensor, smax: torch.Tensor, g_mean: torch.Tensor, g_max: torch.Tensor, buf: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel max's gradient per position, shared among tied channels (``coef``), and the mean
    and max parts of the channel gate's gradient. Leaves the indicator ``F' == max`` in ``buf``;
    at a maximum F' = smax, so F = smax / Mc there."""
    n, c = x.shape[0], x.shape[1]
    hit = torch.eq(torch.mul(x, a.view([n, c] + [1] * (x.dim() - 2)), out=buf), smax, out=buf)
    coef = g_max / hit.sum(dim=1, keepdim=True)
    at_max = _spatial_weighted_sum(hit, smax * coef)
    return coef, _spatial_weighted_sum(x, g_mean) + torch.where(a > 0, at_max / a, 0.0)


def _backward_pass3(
    out: torch.Tensor,
    recompute: bool,
    grad: torch.Tensor,
    x: torch.Tensor,
    a_b: torch.Tensor,
    ms: torch.Tensor,
    smax: torch.Tensor,
    g_mean: torch.Tensor,
    coef: torch.Tensor,
    g_avg: torch.Tensor,
    cmax_b: torch.Tensor,
    g_cmax: torch.Tensor,
) -> torch.Tensor:
    """dL/dF = Mc * (grad * Ms + dmean/C + indicator * coef) + davg/P + the spatial max's part,
    written into ``out``, which holds the indicator already unless ``recompute``."""
    if recompute:
        torch.eq(torch.mul(x, a_b, out=out), smax, out=out)
    torch.addcmul(g_mean, out, coef, out=out)
    out.addcmul_(grad, ms)
    out.mul_(a_b)
    out.add_(g_avg)
    _add_max_grad(out, x, cmax_b, g_cmax)
    return out


# the optional compiled kernel's forward (cbam_insert.native), None while it is not enabled; with
# CBAM_INSERT_NATIVE in the environment the first eligible call asks cbam_insert.native for it
_NATIVE_ENV_VAR = "CBAM_INSERT_NATIVE"
_native_forward: Any = None
_native_env_pending = _NATIVE_ENV_VAR in os.environ  # cleared by the first eligible call, which asks once


@torch.jit.unused
def _native_attend(cbam: CBAM, x: torch.Tensor) -> torch.Tensor | None:
    """The fused inference forward on the native CPU kernel, or None where it does not apply
    (see ``cbam_insert.native``): it is not enabled, or not a contiguous or channels-last float32 CPU input
    without autograd, or tracing / a dispatch mode, or a spatial BatchNorm in training mode."""
    global _native_env_pending
    if _native_forward is None and not _native_env_pending:
        return None
    cg, sg = cbam.channel_gate, cbam.spatial_gate
    assert cg is not None and sg is not None
    norm = sg.norm
    dims = cbam.dims
    if (
        x.dim() != dims + 2
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or type(x) is not torch.Tensor
        or not (x.is_contiguous() or (dims > 1 and x.is_contiguous(memory_format=_memory_format(x))))
        or x.numel() == 0
        or (torch.is_grad_enabled() and x.requires_grad)
        or type(sg.conv) is not _CONVS[dims]
        or sg.conv.padding_mode != "zeros"
        or cg.fc1.weight.dtype != torch.float32
        or cg.fc1.weight.device.type != "cpu"
        or (norm is not None and (norm.training or norm.running_mean is None or norm.running_var is None))
        or _tracing()
        or _get_current_dispatch_mode() is not None
    ):
        return None
    if _native_forward is None:
        _native_env_pending = False
        from . import native

        if native.enable_from_env() is None:
            return None
    out = x if cbam._may_reuse(x) else torch.empty_like(x)
    return _native_forward(
        x,
        cg.fc1.weight,
        cg.fc1.bias,
        cg.fc2.weight,
        cg.fc2.bias,
        sg.conv.weight,
        sg.conv.bias,
        sg.max_first,
        None if norm is None else norm.weight,
        None if norm is None else norm.bias,
        None if norm is None else norm.running_mean,
        None if norm is None else norm.running_var,
        1e-5 if norm is None else float(norm.eps),
        out,
    )


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018) for 1-D, 2-D and 3-D maps.

    ``CBAM(channels)`` is the seed's module: reduction 16, spatial kernel 7, bias-free MLP and
    spatial conv, spatial input ``[mean ; max]``, channel then spatial. It has
    ``2*C*max(1, C//16) + 2*k*k`` parameters.

    Options (keyword arguments, validated at construction):

    * ``reduction`` or ``hidden``: MLP width ``max(1, C // reduction)`` or exactly ``hidden``.
    * ``kernel_size``: odd spatial kernel (7 default, 3 common).
    * ``pool_types``: channel-branch descriptors from ``("avg", "max", "lp", "lse")``.
    * ``channel`` / ``spatial``: switch a branch off (channel-only or spatial-only CBAM).
    * ``order``: ``"channel_first"`` (paper), ``"spatial_first"``, or ``"parallel"``
      (both gates computed from F: ``F'' = Mc(F) * Ms(F) * F``).
    * ``variant``: ``"seed"`` or ``"official"`` (the authors' released code: MLP with biases,
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
    takes a fused path. Without autograd it makes one full-size tensor and scales it in place;
    in eager training a custom autograd function keeps only the input and small per-sample
    tensors for backward. Under TorchScript, tracing, ``torch.compile`` and export the same maths
    runs as plain tensor ops. On the CPU, inference can run as one compiled call instead
    (``cbam_insert.native``, opt-in).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        hidden: int | None = None,
        kernel_size: int = 7,
        pool_types: Sequence[str] = ("avg", "max"),
        channel: bool = True,
        spatial: bool = True,
        order: str = "channel_first",
        variant: str = "seed",
        mlp_bias: bool | None = None,
        spatial_norm: bool | None = None,
        dims: int = 2,
        init: str = "default",
        reuse_input: bool = False,
    ) -> None:
        super().__init__()
        self.channels = _check_positive_int("channels", channels)
        self.dims = _check_dims(dims)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        _check_bool("channel", channel)
        _check_bool("spatial", spatial)
        _check_bool("mlp_bias", mlp_bias, optional=True)
        _check_bool("spatial_norm", spatial_norm, optional=True)
        _check_bool("reuse_input", reuse_input)
        if not (channel or spatial):
            raise ValueError("channel and spatial cannot both be False: CBAM would do nothing")
        official = variant == "official"
        self.variant = variant
        self.order = order
        self.init_mode = init
        self.channel_gate = (
            ChannelAttention(
                channels,
                reduction,
                hidden=hidden,
                pool_types=pool_types,
                bias=official if mlp_bias is None else mlp_bias,
            )
            if channel
            else None
        )
        self.spatial_gate = (
            SpatialAttention(
                kernel_size,
                dims=self.dims,
                norm=official if spatial_norm is None else spatial_norm,
                order="max_mean" if official else "mean_max",
            )
            if spatial
            else None
        )
        # the fused paths are valid for the paper's avg+max pooling, channel then spatial
        self._fast = (
            self.channel_gate is not None
            and self.spatial_gate is not None
            and order == "channel_first"
            and sorted(self.channel_gate.pool_types) == ["avg", "max"]
        )
        self.gamma = nn.Parameter(torch.zeros(1)) if init == "identity" else None
        self.reuse_input = reuse_input

    def extra_repr(self) -> str:
        reuse = ", reuse_input=True" if self.reuse_input else ""
        return f"channels={self.channels}, dims={self.dims}, variant={self.variant!r}, order={self.order!r}{reuse}"

    @torch.jit.unused
    def _may_reuse(self, x: torch.Tensor) -> bool:
        """Whether this call may write its output into ``x`` (see ``reuse_input``)."""
        return (
            self.reuse_input
            and self.gamma is None
            and type(x) is torch.Tensor
            and not (torch.is_grad_enabled() and x.requires_grad)
            and (x.is_contiguous() or x.is_contiguous(memory_format=_memory_format(x)))
            and (torch.is_inference_mode_enabled() or not x.is_inference())
            and not _tracing()
        )

    def _attend_fast(self, x: torch.Tensor) -> torch.Tensor:
        cg = self.channel_gate
        sg = self.spatial_gate
        assert cg is not None and sg is not None
        if not torch.jit.is_scripting():
            native = _native_attend(self, x)
            if native is not None:
                return native
        shape: list[int] = [x.shape[0], self.channels] + [1] * self.dims
        a = torch.sigmoid(cg.logits(x)).view(shape)
        compiling = False
        limit: int | None = None
        if torch.jit.is_scripting():
            refined = x * a
            mean, smax = refined.mean(dim=1, keepdim=True), refined.amax(dim=1, keepdim=True)
        else:
            refined, mean, smax = _refine_and_pool_eager(x, a, reuse=self._may_reuse(x))
            compiling = _tracing()
            limit = _inference_conv_positions()
        ms = torch.sigmoid(sg.head(sg.stack(mean, smax), limit))
        # a compiler fuses ``F' * Ms`` with the product that made F' and never writes F' out,
        # unless F' is updated in place
        if compiling or (torch.is_grad_enabled() and (refined.requires_grad or ms.requires_grad)):
            return refined * ms
        # nothing records F', so the output can reuse its memory
        return refined.mul_(ms)

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
    def _attend_autograd_function(self, x: torch.Tensor) -> torch.Tensor | None:
        """The custom-autograd training path, or None where plain ops must be used."""
        if not torch.is_grad_enabled() or _tracing() or type(x) is not torch.Tensor:
            return None
        params = [p for p in self.parameters() if p is not self.gamma]
        if not (x.requires_grad or any(p.requires_grad for p in params)):
            return None
        return _CBAMFunction.apply(x, self, *params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels, self.dims, "CBAM")
        if self._fast:
            out: torch.Tensor | None = None
            if not torch.jit.is_scripting():
                out = self._attend_autograd_function(x)
            if out is None:
                out = self._attend_fast(x)
        else:
            out = self._attend(x)
        gamma = self.gamma
        if gamma is not None:
            return torch.lerp(x, out, gamma.to(x.dtype))
        return out


def cbam_parameter_count(channels: int, reduction: int = 16, kernel_size: int = 7) -> int:
    """Parameters of the seed's ``CBAM(channels, reduction, kernel_size=k)``."""
    return 2 * channels * max(1, channels // reduction) + 2 * kernel_size**2
