"""The hand-written autograd function for CBAM's training step in eager mode (``CBAMFunction``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .eager import (
    _CONVS,
    _add_max_grad,
    _channel_weighted_sum,
    _mean_and_max_eager,
    _plane,
    _refine_and_pool_eager,
    _sample_step,
    _spatial_weighted_sum,
    channel_head,
    memory_format,
    spatial_dims,
    spatial_head,
)


class CBAMFunction(torch.autograd.Function):
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
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module, *params: torch.Tensor) -> torch.Tensor:
        cg, sg = module.channel_gate, module.spatial_gate
        assert cg is not None and sg is not None
        n, c = x.shape[0], x.shape[1]
        sdims = spatial_dims(x)
        avg, cmax = _mean_and_max_eager(x)
        avg_first = cg.pool_types[0] == "avg"
        pooled_c = torch.stack([avg, cmax] if avg_first else [cmax, avg], dim=0)
        # the small parts: by hand for the plain variant's layers, else on a little autograd graph
        manual = _manual_small_parts(cg, sg)
        if manual:
            hidden = F.relu(F.linear(pooled_c, cg.fc1.weight, cg.fc1.bias))
            gate_c = torch.sigmoid(F.linear(hidden, cg.fc2.weight, cg.fc2.bias).sum(dim=0))
        else:
            with torch.enable_grad():
                pooled_c.requires_grad_()
                gate_c = torch.sigmoid(channel_head(cg, pooled_c))
        a = gate_c.detach()
        refined, mean, smax = _refine_and_pool_eager(x, a.view([n, c] + [1] * len(sdims)))
        pooled_s = sg.stack(mean, smax)
        if manual:
            gate_s = torch.sigmoid(spatial_head(sg, pooled_s))
        else:
            with torch.enable_grad():
                pooled_s.requires_grad_()
                gate_s = torch.sigmoid(spatial_head(sg, pooled_s))
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
        grad = grad.contiguous(memory_format=memory_format(x))
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
    plain variant's layers (two ``nn.Linear``, a zero-padded conv, no norm) with no hooks on them."""
    layers = (cg.fc1, cg.fc2, sg.conv)
    return (
        type(cg.fc1) is nn.Linear
        and type(cg.fc2) is nn.Linear
        and type(sg.conv) in _CONVS
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
