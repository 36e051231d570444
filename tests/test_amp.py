"""CBAM under autocast (mixed precision, as Ultralytics' and users' AMP training runs it): forward
and backward work, and match float32 within bfloat16's precision."""

from __future__ import annotations

import torch
from torch import nn

from cbam_insert import CBAM


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), CBAM(32), nn.Conv2d(32, 4, 1))


def test_training_step_under_cpu_autocast_matches_float32():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ref, amp = _net(), _net()
    ref(x).square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = amp(x)
        assert out.dtype == torch.bfloat16
        loss = out.float().square().mean()
    loss.backward()
    for (name, p), q in zip(ref.named_parameters(), amp.parameters()):
        assert q.grad is not None and q.grad.dtype == torch.float32, name
        assert torch.allclose(q.grad, p.grad, rtol=0.1, atol=1e-3), name


def test_inference_under_cpu_autocast():
    net = _net().eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
    assert torch.allclose(out.float(), ref, rtol=0.05, atol=0.02)
