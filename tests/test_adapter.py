"""Adapter files (only the CBAM weights and the recipe) and remove_cbam."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import fx, nn
from torchvision import models as tvm

from cbam_insert import CBAM, CBAMInsertError, insert_cbam, load_model, remove_cbam, save_model

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return tvm.resnet18().eval()


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return _resnet(0)  # stands in for a base whose weights come from elsewhere (pretrained)


@pytest.fixture(scope="module")
def patched(base: nn.Module) -> nn.Module:
    model = insert_cbam(base, after="block", example_inputs=(torch.rand(1, 3, 64, 64),), seed=0)
    with torch.no_grad():  # trained CBAM weights differ from a fresh patch's
        for name, p in model.named_parameters():
            if "cbam" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_adapter_holds_only_the_cbam_weights_and_the_recipe(patched, tmp_path):
    from safetensors import safe_open

    path = save_model(patched, tmp_path / "r18.safetensors", format="adapter")
    full = save_model(patched, tmp_path / "full.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    cbam_keys = {k for k in patched.state_dict() if ".cbam" in k}
    assert keys == cbam_keys and keys
    assert json.loads(meta["cbam_insert_recipe"]) == patched.cbam_recipe
    ratio = path.stat().st_size / full.stat().st_size
    print(f"adapter {path.stat().st_size / 1e6:.2f} MB of {full.stat().st_size / 1e6:.1f} MB ({100 * ratio:.2f}%)")
    assert ratio < 0.05


def test_adapter_on_the_same_base_weights_equals_the_patched_model(base, patched, tmp_path):
    path = save_model(patched, tmp_path / "a.safetensors", format="adapter")
    other = _resnet(0)  # the same weights built again, as a user would load them from elsewhere
    before = {k: v.clone() for k, v in other.state_dict().items()}
    model = load_model(path, arch=other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items()), "the given model is not changed"
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 8
    with torch.no_grad():
        assert torch.equal(model(X), patched(X))


def test_adapter_keeps_the_bases_own_weights(patched, tmp_path):
    path = save_model(patched, tmp_path / "a.safetensors", format="adapter")
    other = _resnet(5)
    model = load_model(path, arch=other)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    cbam = {k: v for k, v in patched.state_dict().items() if ".cbam" in k}
    assert all(torch.equal(state[k], v) for k, v in cbam.items())


def test_adapter_on_a_spec_builds_the_architecture(patched, tmp_path):
    path = save_model(patched, tmp_path / "a.safetensors", format="adapter")
    model = load_model(path, arch="torchvision:resnet18")
    assert model.cbam_report.modules == patched.cbam_report.modules


def test_adapter_errors_are_one_line(patched, tmp_path):
    path = save_model(patched, tmp_path / "a.safetensors", format="adapter")
    for kwargs, words in [({}, "--arch"), ({"arch": "torchvision:resnet34"}, "recipe"),
                          ({"arch": patched}, "already has CBAM")]:  # fmt: skip
        with pytest.raises(CBAMInsertError) as info:
            load_model(path, **kwargs)
        assert words in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CBAMInsertError, match="not patched"):
        save_model(_resnet(0), tmp_path / "b.safetensors", format="adapter")
    assert not (tmp_path / "b.safetensors").exists()


def test_remove_cbam_gives_back_the_original_architecture_keys_and_outputs(base, patched):
    original = remove_cbam(patched)
    assert type(original) is torchvision.models.ResNet
    assert not any(isinstance(m, (CBAM, fx.GraphModule)) for m in original.modules())
    assert list(original.state_dict()) == list(base.state_dict())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in original.state_dict().items())
    assert not original.training
    with torch.no_grad():
        assert torch.equal(original(X), base(X))
    assert sum(isinstance(m, CBAM) for m in patched.modules()) == 8, "the patched model is not changed"


def test_remove_cbam_keeps_trained_weights_and_mode(patched):
    model = copy.deepcopy(patched).train()
    with torch.no_grad():
        model.get_parameter("conv1.weight").mul_(2)
    original = remove_cbam(model)
    assert original.training
    assert torch.equal(original.conv1.weight, model.get_parameter("conv1.weight"))
    assert original.conv1.weight.data_ptr() != model.get_parameter("conv1.weight").data_ptr()


def test_remove_cbam_of_a_partially_traced_model_restores_its_classes():
    torch.manual_seed(0)
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).eval()
    patched = insert_cbam(det, after="block", example_inputs=([torch.rand(3, 96, 96)],), seed=0)
    original = remove_cbam(patched)
    assert list(original.state_dict()) == list(det.state_dict())
    assert not any(isinstance(m, (CBAM, fx.GraphModule)) for m in original.modules())
    assert type(original.backbone.body) is type(det.backbone.body)
    with torch.no_grad():
        a, b = (
            original([torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(2))]),
            det([torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(2))]),
        )
    assert torch.equal(a[0]["boxes"], b[0]["boxes"])


def test_remove_cbam_of_an_unpatched_model_is_one_line():
    with pytest.raises(CBAMInsertError, match="not patched by cbam-insert"):
        remove_cbam(_resnet(0))


def test_a_deep_copy_of_a_fully_traced_model_keeps_what_it_carries(patched, tmp_path):
    """EMA models and copies before export are deep copies: they still save, adapt and unpatch."""

    twice = copy.deepcopy(copy.deepcopy(patched))
    assert twice.cbam_recipe == patched.cbam_recipe and twice.cbam_recipe is not patched.cbam_recipe
    assert twice.cbam_report.modules == patched.cbam_report.modules
    with torch.no_grad():
        assert torch.equal(remove_cbam(twice)(X), remove_cbam(patched)(X))
        assert torch.equal(load_model(save_model(twice, tmp_path / "t.pt"))(X), patched(X))


def test_the_adapter_extension_picks_the_format(patched, tmp_path):
    from cbam_insert.formats import default_output

    assert default_output("torchvision:resnet18", "adapter").name == "resnet18_cbam.adapter.safetensors"
    path = save_model(patched, tmp_path / "r.adapter.safetensors")
    assert path.stat().st_size < 1_000_000
    assert load_model(path, arch="torchvision:resnet18").cbam_report.modules == patched.cbam_report.modules
