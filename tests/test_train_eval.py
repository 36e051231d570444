"""Train/eval fidelity (issue 18.1): models whose train-mode graph differs from the eval-mode one.

Stochastic depth written in Python (timm's DropPath, efficientnet_pytorch's drop-connect
function, torchvision's StochasticDepth), dropout and auxiliary heads put extra ops into the
train-mode graph. Each CBAM must refine the same tensor in both graphs, be called once per
forward, get a gradient in train mode, and identity init must be exact in both modes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _liveness import live_counts, randomize_norms, same_in_mode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cbam_insert import insert_attention


def _check(model: nn.Module, x: torch.Tensor, after: str, **kw) -> int:
    """Patch ``model`` at ``after`` with identity init and check every CBAM in both modes."""
    model = randomize_norms(model)
    patched = insert_attention(model, after=after, example_inputs=(x,), init="identity", **kw)
    n = len(patched.cbam_report.modules)
    assert n > 0
    for training in (False, True):
        counts = live_counts(patched, (x,), training)
        assert len(counts) == n
        dead = {k: v for k, v in counts.items() if v != (1, True)}
        assert not dead, f"{'train' if training else 'eval'} mode: CBAMs not called once or without gradient: {dead}"
        assert same_in_mode(model, patched, (x,), training) <= 1e-5
    return n


@pytest.mark.parametrize(
    "name,after,expected",
    [("resnet18", "block", 8), ("convnext_atto", "block", 12), ("efficientnet_b0", "block", 9), ("efficientnet_b0", "stage", None)],
)
def test_timm_drop_path_keeps_every_cbam_live_in_train_mode(name: str, after: str, expected: int | None) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.1, num_classes=10)
    n = _check(model, torch.rand(2, 3, 64, 64), after)
    if expected is not None:
        assert n == expected


@pytest.mark.parametrize(("module", "options"), [("triplet", {}), ("simam", {}), ("gam", {"groups": 4}), ("bam", {})])
def test_timm_drop_path_keeps_every_other_module_live_in_train_mode(module: str, options: dict) -> None:
    # the rewritten triplet / SimAM / BAM arithmetic and GAM's grouped variant, in a host that is
    # not torchvision, with stochastic depth in its train-mode graph
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.1, num_classes=10)
    assert _check(model, torch.rand(2, 3, 64, 64), "block", module=module, **options) == 8


@pytest.mark.parametrize("after", ["block", "stage"])
def test_efficientnet_pytorch_drop_connect_is_not_a_site(after: str) -> None:
    """The drop-connect mask (``keep_prob + torch.rand(...)``, shape [N,1,1,1]) comes before the
    residual ``add`` in the same scope in train mode: the CBAM must stay on the residual."""
    ep = pytest.importorskip("efficientnet_pytorch")
    model = ep.EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=64)
    model.set_swish(memory_efficient=False)
    n = _check(model, torch.rand(2, 3, 64, 64), after)
    if after == "block":
        assert n == 9


def test_torchvision_stochastic_depth_and_dropout() -> None:
    from torchvision.models import efficientnet_b0

    model = efficientnet_b0(weights=None, stochastic_depth_prob=0.5, num_classes=10)
    assert _check(model, torch.rand(2, 3, 64, 64), "block") == 9


def test_auxiliary_heads_read_the_refined_stage_in_train_mode() -> None:
    from torchvision.models import googlenet

    model = googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=10)
    _check(model, torch.rand(2, 3, 96, 96), "stage")


# ----------------------------------------------------------------------------- random blocks


class DropPath(nn.Module):
    """timm-style stochastic depth: a module whose train-mode ops live in its own scope."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def drop_connect(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """efficientnet_pytorch-style: a function, so its ops are in the calling block's scope."""
    if not training:
        return x
    mask = 1 - p
    mask += torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device)
    return x / (1 - p) * torch.floor(mask)


class Block(nn.Module):
    def __init__(self, ch: int, drop: str, where: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.drop, self.where = drop, where
        self.drop_path = DropPath(0.3)
        self.dropout = nn.Dropout2d(0.2)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop == "path":
            return self.drop_path(x)
        if self.drop == "connect":
            return drop_connect(x, 0.3, self.training)
        if self.drop == "dropout":
            return F.dropout(x, 0.2, self.training)
        if self.drop == "dropout2d":
            return self.dropout(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        if self.where == "middle":
            y = self._drop(y)
        y = self.bn2(self.conv2(y))
        if self.where == "end":
            y = self._drop(y)
        return F.relu(x + y) if self.where != "swap" else F.relu(self._drop(y) + x)


class DropNet(nn.Module):
    def __init__(self, blocks: list[tuple[str, str]], ch: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.blocks = nn.Sequential(*(Block(ch, d, w) for d, w in blocks))
        self.head = nn.Linear(ch, 4)
        self.aux = nn.Linear(ch, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        out = self.head(x.mean((2, 3)))
        if self.training:  # an auxiliary head only in train mode
            out = out + self.aux(x.amax((2, 3)))
        return out


_BLOCKS = st.lists(
    st.tuples(st.sampled_from(["none", "path", "connect", "dropout", "dropout2d"]), st.sampled_from(["end", "middle", "swap"])),
    min_size=1,
    max_size=4,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=_BLOCKS, after=st.sampled_from(["block", "conv"]))
def test_random_blocks_with_train_only_ops_keep_every_cbam_live(blocks: list[tuple[str, str]], after: str) -> None:
    torch.manual_seed(0)
    n = _check(DropNet(blocks), torch.rand(2, 3, 8, 8), after)
    assert n == (len(blocks) if after == "block" else 1 + 2 * len(blocks))
