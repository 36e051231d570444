"""A file this tool patched converts to every format from the CLI without being patched again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cbam_insert import CBAM, load_model
from cbam_insert.cli import app

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def run(*args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def patched_pt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("convert")
    res = run("torchvision:resnet18", "--input-shape", "1,3,64,64", "--seed", "0", "-o", "r18.pt", "-q", cwd=d)
    assert res.exit_code == 0, res.output
    return d / "r18.pt"


@pytest.fixture(scope="module")
def reference(patched_pt) -> torch.Tensor:
    with torch.no_grad():
        return load_model(patched_pt).eval()(X)


def _outputs(path: Path, fmt: str) -> torch.Tensor:
    with torch.no_grad():
        if fmt == "torchscript":
            return torch.jit.load(str(path))(X)
        if fmt == "pt2":
            return torch.export.load(str(path)).module()(X)
        if fmt == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return torch.from_numpy(session.run(None, {"input": X.numpy()})[0])
        arch = "torchvision:resnet18" if fmt in ("state-dict", "safetensors", "adapter") else None
        return load_model(path, arch=arch).eval()(X)


@pytest.mark.parametrize(("name", "fmt"), [("c.pt", "pt"), ("c.pth", "state-dict"), ("c.safetensors", "safetensors"),
                                           ("c.ts", "torchscript"), ("c.onnx", "onnx"), ("c.pt2", "pt2")])  # fmt: skip
def test_a_patched_pt_converts_to_every_format_without_patching_again(patched_pt, reference, name, fmt):
    out = patched_pt.parent / f"{fmt}-{name}"
    res = run(patched_pt, "-o", out.name, "--json", cwd=patched_pt.parent)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["converted"] is True and len(data["modules"]) == 8
    got = _outputs(out, fmt)
    assert torch.allclose(got, reference, atol=1e-4, rtol=1e-4)


def test_an_adapter_and_a_state_dict_with_its_recipe_convert_too(patched_pt, reference):
    d = patched_pt.parent
    assert run(patched_pt, "--format", "adapter", "-o", "a.safetensors", "-q", cwd=d).exit_code == 0
    res = run("a.safetensors", "--arch", "torchvision:resnet18", "-o", "from_adapter.pt", "-q", cwd=d)
    assert res.exit_code == 0, res.output
    assert run(patched_pt, "-o", "w.pth", "-q", cwd=d).exit_code == 0
    res = run("w.pth", "--arch", "torchvision:resnet18", "-o", "from_pth.pt", "-q", cwd=d)
    assert res.exit_code == 0, res.output
    for name in ("from_adapter.pt", "from_pth.pt"):
        model = load_model(d / name).eval()
        assert sum(isinstance(m, CBAM) for m in model.modules()) == 8, "not patched twice"
        with torch.no_grad():
            assert torch.equal(model(X), reference)


def test_converting_says_so(patched_pt):
    res = run(patched_pt, "-o", "said.pt", cwd=patched_pt.parent)
    assert res.exit_code == 0, res.output
    assert "converted to said.pt without patching again" in " ".join(res.stdout.split())


def test_asking_for_more_sites_on_a_patched_file_still_patches(patched_pt):
    res = run(patched_pt, "--after", "conv", "--max-sites", "2", "-o", "more.pt", "--json", cwd=patched_pt.parent)
    assert res.exit_code == 0, res.output
    assert "converted" not in json.loads(res.stdout)
    assert sum(isinstance(m, CBAM) for m in load_model(patched_pt.parent / "more.pt").modules()) == 10
