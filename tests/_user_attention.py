"""User attention classes for the tests: importable as ``_user_attention:Name`` (tests/ is on the path)."""

from __future__ import annotations

import torch
from torch import nn


class KeepShape(nn.Module):
    """A user module that takes ``dims``: a per-channel learnable scale through a sigmoid."""

    def __init__(self, channels: int, dims: int = 2, bias: float = 0.0) -> None:
        super().__init__()
        self.dims = dims
        self.logit = nn.Parameter(torch.full((channels,), float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.logit).view(1, -1, *[1] * self.dims)


class Shrink(nn.Module):
    """Returns half the channels: not an attention module."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, max(1, channels // 2), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def make_gate(channels: int) -> nn.Module:
    """A factory (no ``dims``): SE-like gate built from torch layers."""
    hidden = max(1, channels // 4)
    return _Gate(channels, hidden)


class _Gate(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]
