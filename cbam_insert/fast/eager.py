"""Eager-mode fast helpers for CBAM on the CPU: cache-blocked reductions, PyTorch's native small
convolution, and the fused inference forward (``attend_inference``).

The maths is ``cbam_insert.modules``'; these functions compute the same values with fewer passes
over memory. Nothing here is seen by TorchScript, tracing, ``torch.compile`` or export: the
entry point (``cbam_insert.fast.attend``) declines there and the plain formulation runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def spatial_dims(x: torch.Tensor) -> list[int]:
    return list(range(2, x.dim()))


def tracing() -> bool:
    """True under tracing, torch.compile and export, where plain ops give the cleanest graph."""
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
    )


def memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# above, its im2col buffer (k*k*2 floats a position) costs page faults on a busy machine. Without
# autograd the bar is higher (measured: 1x2x56x56 34 vs 58 us warm, 69 vs 130 us with the caches full
# of other data; equal at 6272 positions); in training a 4x28x28 map was 13 % slower fwd+bwd natively
_NATIVE_CONV_POSITIONS = 1024
_NATIVE_CONV_POSITIONS_INFERENCE = 4096


def _inference_conv_positions() -> int:
    return _NATIVE_CONV_POSITIONS_INFERENCE


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
        and not tracing()
        and _get_current_dispatch_mode() is None
    )


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



def _channel_max_eager(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(dim=1, keepdim=True)``, folded with elementwise maxima when maps are small.

    The max-reduction kernel works along the contiguous spatial positions; for small maps with
    an odd number of positions (7x7) that is several times slower than halving the channels
    with ``torch.maximum``, which gives bit-identical results (a max is exact).
    """
    if _no_folding(x) or x.shape[1] < 16 or not _odd_small(_plane(x)):
        return x.amax(dim=1, keepdim=True)
    return _fold_max(x, 1).amax(dim=1, keepdim=True)


def _spatial_max_eager(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(dim=spatial dims)``, (N, C), by the same folding when maps are small."""
    size = _plane(x)
    if _no_folding(x) or not _odd_small(size) or x.shape[0] * x.shape[1] < _SPATIAL_FOLD_ROWS:
        return x.amax(dim=spatial_dims(x))
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
        tracing() or x.device.type != "cpu" or not x.is_contiguous() or (torch.is_grad_enabled() and x.requires_grad)
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


def _mean_and_max_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spatial mean and max of each channel, (N, C) each, a block of samples at a time so that
    the max reads the block from cache."""
    n = x.shape[0]
    step = _sample_step(x)
    if step >= n:
        return x.mean(dim=spatial_dims(x)), _spatial_max_eager(x)
    avg = x.new_empty(x.shape[:2])
    mx = x.new_empty(x.shape[:2])
    for i in range(0, n, step):
        block = x[i : i + step]
        torch.mean(block, dim=spatial_dims(x), out=avg[i : i + step])
        mx[i : i + step] = _spatial_max_eager(block)
    return avg, mx


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
    if step >= n or needs_graph or tracing():
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
    return (t * w).sum(dim=spatial_dims(t))


# scratch size for the spatial-max gradient, which is added a block of rows at a time
_SCRATCH_BYTES = 1 << 20


def _add_max_grad(out: torch.Tensor, x: torch.Tensor, mx: torch.Tensor, g: torch.Tensor) -> None:
    """``out += (x == mx) * g / ties`` with ``mx``, ``g`` of shape (N, C, 1, ...) and ties counted
    per (n, c): amax's gradient. Rows are done in blocks through a small scratch buffer, so the
    backward allocates no second full-size tensor."""
    n, c = x.shape[0], x.shape[1]
    if not (x.is_contiguous() and out.is_contiguous()):
        hit = torch.eq(x, mx).to(x.dtype)
        out.addcmul_(hit, g / hit.sum(dim=spatial_dims(x), keepdim=True))
        return
    rows, size = n * c, _plane(x)
    xv, ov, mv, gv = x.view(rows, size), out.view(rows, size), mx.reshape(rows, 1), g.reshape(rows, 1)
    step = max(1, _SCRATCH_BYTES // (size * x.element_size()))
    scratch = x.new_empty(min(step, rows), size)
    for r in range(0, rows, step):
        e = min(rows, r + step)
        hit = torch.eq(xv[r:e], mv[r:e], out=scratch[: e - r])
        ov[r:e].addcmul_(hit, gv[r:e] / hit.sum(dim=1, keepdim=True))




def channel_pool(cg: Any, x: torch.Tensor) -> torch.Tensor:
    """``cg.pool(x)`` with the cache-friendly spatial max: (len(pool_types), N, C)."""
    if any(p not in ("avg", "max") for p in cg.pool_types):
        return cg.pool(x)
    dims = spatial_dims(x)
    return torch.stack([x.mean(dim=dims) if p == "avg" else _spatial_max_eager(x) for p in cg.pool_types], dim=0)


def channel_head(cg: Any, pooled: torch.Tensor) -> torch.Tensor:
    """``cg.head(pooled)``; a few descriptors go through PyTorch's native matrix-vector kernel."""
    if type(cg.fc1) is nn.Linear and type(cg.fc2) is nn.Linear and _native_ok(pooled, pooled.shape[0] * pooled.shape[1], 4):
        return _mlp_native(cg.fc1, cg.fc2, pooled)
    return cg.head(pooled)


def spatial_head(sg: Any, pooled: torch.Tensor, native_positions: int | None = None) -> torch.Tensor:
    """``sg.head(pooled)`` with the small-map convolution on PyTorch's native kernel. ``native_positions``:
    up to how many positions (batch x map) an eager CPU call may use it."""
    out = _small_conv_eager(sg.conv, pooled, native_positions)
    if sg.norm is not None:
        out = sg.norm(out)
    return out


def may_reuse(cbam: Any, x: torch.Tensor) -> bool:
    """Whether this call may write its output into ``x`` (see ``CBAM``'s ``reuse_input``)."""
    return (
        cbam.reuse_input
        and cbam.gamma is None
        and type(x) is torch.Tensor
        and not (torch.is_grad_enabled() and x.requires_grad)
        and (x.is_contiguous() or x.is_contiguous(memory_format=memory_format(x)))
        and (torch.is_inference_mode_enabled() or not x.is_inference())
        and not tracing()
    )


def attend_inference(cbam: Any, x: torch.Tensor) -> torch.Tensor:
    """The fused channel-then-spatial forward without an autograd graph on F': one full-size tensor,
    reductions a block of samples at a time."""
    cg, sg = cbam.channel_gate, cbam.spatial_gate
    shape: list[int] = [x.shape[0], cbam.channels] + [1] * cbam.dims
    a = torch.sigmoid(channel_head(cg, channel_pool(cg, x))).view(shape)
    refined, mean, smax = _refine_and_pool_eager(x, a, reuse=may_reuse(cbam, x))
    ms = torch.sigmoid(spatial_head(sg, sg.stack(mean, smax), _inference_conv_positions()))
    if torch.is_grad_enabled() and (refined.requires_grad or ms.requires_grad):
        return refined * ms
    # nothing records F', so the output can reuse its memory
    return refined.mul_(ms)
