"""Deployment exports: ONNX (checked in onnxruntime) and pt2 with dynamic batch and spatial sizes,
named inputs and outputs, fixed shapes on request."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from cbam_insert import insert_cbam, save_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SIZES = [(1, 64), (3, 96)]  # two batch sizes at two resolutions


@pytest.fixture(scope="module")
def patched() -> nn.Module:
    torch.manual_seed(0)
    return insert_cbam(tvm.resnet18(), after="block", example_inputs=(torch.rand(1, 3, 64, 64),), seed=0).eval()


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _x(b: int, s: int) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(b * s))


@pytest.fixture(scope="module")
def onnx_file(patched, tmp_path_factory) -> str:
    return str(save_model(patched, tmp_path_factory.mktemp("onnx") / "r18.onnx"))


def test_onnx_has_named_dynamic_batch_and_spatial_dims(onnx_file):
    graph = onnx.load(onnx_file).graph
    assert [(i.name, _dims(i)) for i in graph.input] == [("input", ["batch", 3, "height", "width"])]
    assert [(o.name, _dims(o)) for o in graph.output] == [("output", ["batch", 1000])]


@pytest.mark.parametrize(("batch", "size"), SIZES)
def test_onnx_matches_pytorch_in_onnxruntime_at_several_shapes(patched, onnx_file, batch, size):
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    x = _x(batch, size)
    (out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = patched(x)
    assert out.shape == tuple(ref.shape)
    assert torch.allclose(torch.from_numpy(out), ref, atol=1e-4, rtol=1e-4)


def test_pt2_has_a_dynamic_batch_and_spatial_sizes(patched, tmp_path):
    program = torch.export.load(save_model(patched, tmp_path / "r18.pt2"))
    module = program.module()
    for batch, size in SIZES:
        x = _x(batch, size)
        with torch.no_grad():
            assert torch.allclose(module(x), patched(x), atol=1e-5, rtol=1e-5)


class FixedHead(nn.Module):
    """A flatten into a linear layer: only the batch can change."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


def test_a_model_with_fixed_spatial_size_gets_a_dynamic_batch_only(tmp_path):
    torch.manual_seed(0)
    model = insert_cbam(FixedHead(), after="conv", example_inputs=(torch.rand(1, 3, 8, 8),), seed=0).eval()
    path = str(save_model(model, tmp_path / "f.onnx"))
    (inp,) = onnx.load(path).graph.input
    assert _dims(inp) == ["batch", 3, 8, 8]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), model(x), atol=1e-5)


def test_fixed_shapes_on_request(patched, tmp_path):
    path = str(save_model(patched, tmp_path / "s.onnx", dynamic=False, example_inputs=(torch.rand(2, 3, 64, 64),)))
    (inp,) = onnx.load(path).graph.input
    assert _dims(inp) == [2, 3, 64, 64]
    program = torch.export.load(save_model(patched, tmp_path / "s.pt2", dynamic=False))
    (val,) = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert tuple(val.shape) == (1, 3, 64, 64)
