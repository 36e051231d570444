"""Hugging Face transformers: a patched model through save_pretrained and back, models built from
configs (nothing downloaded)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from cbam_insert import CBAM, CBAMInsertError, insert_cbam
from cbam_insert.integrations.transformers import CONFIG_KEY, from_pretrained

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                          num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    return ResNetForImageClassification, ResNetForImageClassification(config).eval()


@pytest.fixture(scope="module")
def patched():
    cls, model = _resnet()
    out = insert_cbam(model, after="block", example_inputs=(torch.rand(1, 3, 64, 64),), seed=0).eval()
    with torch.no_grad():  # as if trained: CBAM weights that a fresh patch would not reproduce
        for name, p in out.named_parameters():
            if ".cbam" in name:
                p.add_(torch.randn_like(p))
    return cls, out


def _logits(model, x=X):
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_the_patched_model_keeps_its_class_and_config_carries_the_recipe(patched):
    cls, model = patched
    assert type(model) is cls
    assert getattr(model.config, CONFIG_KEY) == model.cbam_recipe
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 4


def test_save_pretrained_and_from_pretrained_give_the_same_outputs(patched, tmp_path):
    cls, model = patched
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY] == model.cbam_recipe
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        saved = set(fh.keys())
    cbam = {k for k in model.state_dict() if ".cbam" in k}
    assert cbam and cbam <= saved, "save_pretrained keeps every CBAM weight"
    again = from_pretrained(cls, tmp_path)
    assert type(again) is cls and not again.training
    assert torch.equal(_logits(again), _logits(model))
    plain = cls.from_pretrained(tmp_path).eval()  # what the plain loader gives: CBAM dropped, outputs differ
    assert not torch.allclose(_logits(plain), _logits(model), atol=1e-3)


def test_sharded_checkpoints_load_too(patched, tmp_path):
    cls, model = patched
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(from_pretrained(cls, tmp_path)), _logits(model))


def test_saving_again_after_loading_keeps_cbam(patched, tmp_path):
    cls, model = patched
    model.save_pretrained(tmp_path / "a")
    from_pretrained(cls, tmp_path / "a").save_pretrained(tmp_path / "b")
    assert torch.equal(_logits(from_pretrained(cls, tmp_path / "b")), _logits(model))


def test_an_unpatched_directory_loads_plainly_and_errors_are_one_line(tmp_path):
    cls, model = _resnet()
    model.save_pretrained(tmp_path / "plain")
    assert torch.equal(_logits(from_pretrained(cls, tmp_path / "plain")), _logits(model))
    with pytest.raises(CBAMInsertError, match="not a directory"):
        from_pretrained(cls, tmp_path / "missing")
