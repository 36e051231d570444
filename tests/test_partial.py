"""Partial-tracing fidelity (issue 18.2-3): a traced submodule of an untraceable model stays the
host's own object, and a child that does not trace becomes an opaque leaf.

Models come from segmentation_models_pytorch, ultralytics and transformers, built from configs
with random weights (no download).
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from _liveness import first_tensor, live_counts, randomize_norms

from cbam_insert import CBAMInsertError, find_sites, insert_cbam
from cbam_insert.modules import CBAM


def _cbams(model: torch.nn.Module) -> int:
    return sum(isinstance(m, CBAM) for m in model.modules())


@pytest.mark.parametrize("arch", ["FPN", "DeepLabV3Plus"])
def test_smp_encoder_keeps_its_class_properties_and_survives_copies(arch: str) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

    model = getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=2).eval()
    x = torch.rand(1, 3, 64, 64)
    patched = insert_cbam(model, after="block", example_inputs=(x,))
    assert "<model>" not in patched.cbam_report.traced  # the top level does not trace: partial
    enc = patched.encoder
    assert type(enc) is ResNetEncoder and isinstance(enc, ResNetEncoder)
    assert enc.output_stride == model.encoder.output_stride  # a @property of the class
    assert enc.out_channels == model.encoder.out_channels
    assert callable(enc.get_stages) and len(enc.get_stages()) == len(model.encoder.get_stages())
    y = patched(x)
    assert not torch.allclose(y, model(x))  # CBAM (default init) changes the output
    copied = copy.deepcopy(patched)
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (copied, loaded):
        assert type(other.encoder) is ResNetEncoder
        assert _cbams(other) == 8
        assert torch.equal(other(x), y)
    assert set(model.state_dict()) <= set(patched.state_dict())


def test_yolo_layers_keep_attributes_and_cbam_survives_fuse() -> None:
    """ultralytics reads ``f`` and ``i`` on every layer and deep-copies the model for its EMA;
    ``fuse()`` folds each Conv's bn into its conv, deletes ``bn`` and assigns ``forward``."""
    pytest.importorskip("ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = randomize_norms(DetectionModel("yolov8n.yaml", verbose=False)).eval()
    x = torch.rand(1, 3, 64, 64)
    # conv sites: most are a traced Conv's own output (forward hooks); blocks: rewritten Bottlenecks
    patched = insert_cbam(model, after="conv", example_inputs=(x,), include=["model.[0-4].*"])
    patched = insert_cbam(patched, after="block", example_inputs=(x,))
    n = len(patched.cbam_recipe["steps"][0]["modules"]) + len(patched.cbam_recipe["steps"][1]["modules"])
    assert n == _cbams(patched) > 10
    y = first_tensor(patched(x))
    ema = copy.deepcopy(patched)
    assert [(layer.f, layer.i) for layer in ema.model] == [(layer.f, layer.i) for layer in model.model]
    ema.fuse(verbose=False)
    assert not any(hasattr(m, "bn") for m in ema.modules() if type(m).__name__ == "Conv")
    counts = live_counts(ema, (x,), training=False)
    assert len(counts) == n and all(c == 1 for c, _ in counts.values())
    fused = first_tensor(ema(x))
    assert torch.allclose(fused, y, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(first_tensor(model(x)), y, atol=1e-3)


def test_hf_mobilenetv2_tf_padding_blocks_become_opaque_leaves_and_the_rest_gets_sites() -> None:
    """``MobileNetV2ConvLayer`` computes its padding with ``int()`` on a tensor size: it does not
    trace, but the inverted residual blocks around it do."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileNetV2Config(num_labels=10, image_size=64, tf_padding=True)
    model = transformers.MobileNetV2ForImageClassification(config).eval()
    x = torch.rand(1, 3, 64, 64)
    patched = insert_cbam(model, after="block", example_inputs=(x,), init="identity")
    assert len(patched.cbam_report.modules) == 10
    assert any("MobileNetV2ConvLayer does not trace" in why for _, why in patched.cbam_report.untraced)
    out = patched(x)
    assert type(out).__name__ == "ImageClassifierOutputWithNoAttention"
    assert torch.allclose(out.logits, model(x).logits, atol=1e-5)
    conv = [s for s in find_sites(model, after="conv", example_inputs=(x,)) if s.used]
    assert len(conv) > 30  # the opaque conv layers themselves are conv units


def test_no_site_error_names_the_parts_that_do_not_trace() -> None:
    class Gate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x  # control flow on a tensor

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = Gate()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(x) * 2

    with pytest.raises(CBAMInsertError, match=r"not traced: gate: Gate does not trace; kept opaque.*control flow"):
        insert_cbam(Net(), after="block", example_inputs=(torch.rand(2, 4),))


def test_cli_3d_monai_model_without_input_shape_prints_one_line(tmp_path) -> None:
    """The inferred 3-D input is too small for four poolings: fake tensors fail first (torch logs
    that with a traceback), then the real run; stderr must hold only the one-line error."""
    import subprocess
    import sys

    nets = pytest.importorskip("monai.networks.nets")
    path = tmp_path / "basicunet3d.pt"
    torch.save(nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8)), path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-m", "cbam_insert", str(path), "--trust", "--dry-run"], capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 1
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("error: the model does not run on the example inputs")


def test_submodules_of_an_opaque_leaf_are_traced_on_their_own() -> None:
    """SSDLite's heads do not trace (they iterate a proxy), the convs inside them do: the head is
    an opaque leaf in the traced ``head`` and its per-level convs are traced parts of their own."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    sites = [s for s in find_sites(model, after="conv", example_inputs=([torch.rand(3, 320, 320)],)) if s.used]
    assert any(s.name.startswith("head.regression_head.module_list.") for s in sites)
    assert any(s.name.startswith("head.classification_head.module_list.") for s in sites)
    assert len(sites) == 76
