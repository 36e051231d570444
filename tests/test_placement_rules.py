"""Stage, block and conv rules on other libraries' models (issue 18.4-5), random weights."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from cbam_insert import find_sites


def _used(model: nn.Module, after: str, x: torch.Tensor) -> list:
    return [s for s in find_sites(model, after=after, example_inputs=(x,)) if s.used]


def _yolo(cfg: str) -> nn.Module:
    pytest.importorskip("ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel

    return (ClassificationModel if "-cls" in cfg else DetectionModel)(cfg, verbose=False)


def test_smp_unet_stages_are_the_encoders_not_the_decoder_or_the_head() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("resnet18", encoder_weights=None, classes=2)
    stages = _used(model, "stage", torch.rand(1, 3, 64, 64))
    assert [s.name for s in stages] == ["encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder"]
    assert [s.shape[1:] for s in stages][-1] == (512, 2, 2)


def test_smp_fpn_last_stage_is_the_encoders_not_the_lateral_conv() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    stages = _used(smp.FPN("resnet18", encoder_weights=None, classes=2), "stage", torch.rand(1, 3, 64, 64))
    assert [s.name for s in stages] == ["encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4"]


def test_monai_segresnet_stages_stop_before_the_decoder_and_conv_final() -> None:
    nets = pytest.importorskip("monai.networks.nets")
    model = nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8)
    stages = _used(model, "stage", torch.rand(1, 1, 32, 32, 32))
    assert stages and all(s.name.startswith("down_layers.") for s in stages)
    assert [s.shape[2:] for s in stages] == [(32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)][-len(stages) :]


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolov8n-cls.yaml"])
def test_yolo_stages_are_the_backbones_levels_across_traced_layers(cfg: str) -> None:
    """The top level does not trace; each layer is its own traced part. Stages are found across
    them: one per resolution of the backbone, never a Detect box/class conv."""
    stages = _used(_yolo(cfg), "stage", torch.rand(1, 3, 64, 64))
    assert [s.shape[2:] for s in stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert not any(".cv2." in s.name.replace("model.22", "") or s.name.startswith("model.22") for s in stages)
    assert stages[0].name == "model.2.cv2"  # C2f's output (its cv2), not the strided conv before it


def test_hf_mobilenetv2_partial_stages_are_not_one_per_block() -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(num_labels=10, image_size=64))
    stages = _used(model, "stage", torch.rand(1, 3, 64, 64))
    assert [s.name for s in stages] == [
        "mobilenet_v2.conv_stem",
        "mobilenet_v2.layer.1",
        "mobilenet_v2.layer.4",
        "mobilenet_v2.layer.11",
        "mobilenet_v2.layer.15",
    ]


class _TCNBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.PReLU(), nn.GroupNorm(1, c))
        self.res = nn.Conv1d(c, c, 1)
        self.skip = nn.Conv1d(c, c, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        return self.res(h), self.skip(h)


class ConvTasNetLike(nn.Module):
    """torchaudio's ConvTasNet mask generator in small: residual blocks plus a running skip sum."""

    def __init__(self, c: int = 8, n: int = 4) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, c, 3, padding=1)
        self.blocks = nn.ModuleList(_TCNBlock(c) for _ in range(n))
        self.out = nn.Conv1d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        acc = 0.0
        for block in self.blocks:
            r, s = block(x)
            x = x + r
            acc = acc + s
        return self.out(acc)


def test_skip_sum_accumulations_are_not_residual_blocks() -> None:
    sites = find_sites(ConvTasNetLike(), after="block", example_inputs=(torch.rand(1, 1, 64),))
    used = [s for s in sites if s.used]
    acc = [s for s in sites if not s.used]
    assert len(used) == 4 and all(s.reason == "residual branch (identity shortcut)" for s in used)
    assert len(acc) == 3 and all(s.reason.startswith("accumulating sum") for s in acc)


class _ConvGRU(nn.Module):
    """RAFT's convolutional GRU: h' = (1 - z) * h + z * q."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.convz = nn.Conv2d(2 * c, c, 3, padding=1)
        self.convr = nn.Conv2d(2 * c, c, 3, padding=1)
        self.convq = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


class _GRUThenResidual(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.gru = _ConvGRU(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.gru(h, x)
        return h + self.conv(torch.relu(h))


def test_a_gru_update_is_a_gated_merge_not_a_residual_block() -> None:
    x = torch.rand(1, 8, 12, 12)
    sites = find_sites(_GRUThenResidual(), after="block", example_inputs=(x, x))
    by_name = {s.name: s for s in sites}
    gru = [s for s in sites if s.name.startswith("gru.")]
    assert len(gru) == 1 and not gru[0].used
    assert gru[0].reason == "gated merge (z*a + (1 - z)*b with a sigmoid gate z, as in a GRU): not a residual block"
    assert [s.reason for s in sites if s.used] == ["residual branch (identity shortcut)"], by_name


class _ShortcutFirst(nn.Module):
    """A residual block whose strided projection runs before its branch, as RegNet's
    ``proj(x) + f(x)``: in graph order a half-size map comes before the full-size branch conv."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1, stride=stride)
        self.a = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, stride=stride, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x) + self.b(self.a(x)))


def test_a_shortcut_computed_before_its_branch_does_not_end_the_backbone() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        *(nn.Sequential(_ShortcutFirst(c, 2 * c, 2), _ShortcutFirst(2 * c, 2 * c, 1)) for c in (8, 16, 32)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    sites = [s for s in find_sites(model, after="stage", example_inputs=(torch.rand(1, 3, 64, 64),)) if s.used]
    assert [s.shape[2:] for s in sites] == [(32, 32), (16, 16), (8, 8)]
    assert [s.stage for s in sites] == [1, 2, 3]


def test_yolo11_attention_plus_positional_conv_is_not_a_residual_block() -> None:
    sites = find_sites(_yolo("yolo11n.yaml"), after="block", example_inputs=(torch.rand(1, 3, 64, 64),))
    attn = [s for s in sites if s.name.endswith("attn.add")]
    assert attn and all(not s.used and s.reason.startswith("attention output plus a positional term") for s in attn)
    psa = [s for s in sites if s.name.endswith("m.0.add") and s.name.startswith("model.10")]
    assert psa and all(s.used for s in psa)  # x + attn(x) around it is a residual block


def test_frozen_and_one_channel_convs_are_not_conv_sites() -> None:
    sites = find_sites(_yolo("yolov8n.yaml"), after="conv", example_inputs=(torch.rand(1, 3, 64, 64),))
    dfl = [s for s in sites if "dfl" in s.name]
    assert dfl and not any(s.used for s in dfl)
    assert all("requires_grad=False" in s.reason for s in dfl)

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 1, 1))
    net[2].requires_grad_(False)
    reasons = {s.name: (s.used, s.reason) for s in find_sites(net, after="conv", example_inputs=(torch.rand(1, 3, 16, 16),))}
    assert reasons["0"][0] is True
    assert reasons["2"] == (False, "a frozen conv (requires_grad=False): not a learnable feature map")
    assert reasons["3"] == (False, "a one-channel conv output: nothing for channel attention to weigh")


def test_fpn_detector_stages_and_the_layer4_limitation() -> None:
    # a known limitation (docs/limitations.md): the FPN's lateral convs read C3 and C4 after C5 is
    # computed, before its first upsampling, so C5 is no point every path passes through and
    # `stage` finds layer1-layer3; the fourth is a name placement away
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    x = ([torch.rand(3, 128, 128)],)
    sites = [s for s in find_sites(model, after="stage", example_inputs=x) if s.used]
    assert [s.name for s in sites] == ["backbone.body.layer1", "backbone.body.layer2", "backbone.body.layer3"]
    assert [s.shape[1] for s in sites] == [256, 512, 1024] and [s.stage for s in sites] == [1, 2, 3]
    fourth = [s for s in find_sites(model, after="backbone.body.layer4", example_inputs=x) if s.used]
    assert [(s.name, s.shape[1]) for s in fourth] == [("backbone.body.layer4", 2048)]
