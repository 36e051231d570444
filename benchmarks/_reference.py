"""The reference CBAM the benchmarks compare against: the straightforward formulation.

Written op for op from the paper's equations (Woo et al., ECCV 2018), the way most
implementations write it::

    Mc(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))       MLP = 1x1 conv C -> C/r, ReLU, 1x1 conv C/r -> C
    Ms(F) = sigmoid(conv_kxk(cat[mean_c(F), max_c(F)]))
    F' = Mc(F) * F,   F'' = Ms(F') * F'

``nn.AdaptiveAvgPool2d`` and ``nn.AdaptiveMaxPool2d`` make the channel descriptors, the shared MLP
is two bias-free 1x1 convolutions applied to each descriptor separately, ``torch.mean`` and
``torch.max`` over channels are concatenated with ``torch.cat`` for the bias-free k x k convolution,
and both products allocate a new full-size tensor. :meth:`ReferenceCBAM.like` copies the weights of
a ``cbam_insert.CBAM`` in the plain variant (2-D, default options), so the two compute the same
function and their outputs can be checked to agree before timing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceCBAM(nn.Module):
    """CBAM for (N, C, H, W) maps, channel gate then spatial gate, as the equations read."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def mlp(self, v: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.mlp(self.avg_pool(x)) + self.mlp(self.max_pool(x)))
        mean = torch.mean(x, dim=1, keepdim=True)
        mx, _ = torch.max(x, dim=1, keepdim=True)
        return x * torch.sigmoid(self.conv(torch.cat([mean, mx], dim=1)))

    @classmethod
    def like(cls, cbam: nn.Module) -> ReferenceCBAM:
        """A reference module with the weights, device and dtype of ``cbam`` (a 2-D ``CBAM(C)``)."""
        cg, sg = cbam.channel_gate, cbam.spatial_gate
        if cg is None or sg is None:
            raise ValueError("the reference CBAM has both gates; this module lacks one")
        ref = cls(cbam.channels, kernel_size=sg.kernel_size)
        p = next(cbam.parameters())
        ref.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            ref.fc1.weight.copy_(cg.fc1.weight[:, :, None, None])
            ref.fc2.weight.copy_(cg.fc2.weight[:, :, None, None])
            ref.conv.weight.copy_(sg.conv.weight)
        return ref
