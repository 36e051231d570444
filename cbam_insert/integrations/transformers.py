"""Hugging Face transformers: patched models through ``save_pretrained`` and back.

    from transformers import ResNetForImageClassification
    from cbam_insert import insert_cbam
    from cbam_insert.integrations.transformers import from_pretrained

    patched = insert_cbam(model, after="block")       # model: a PreTrainedModel
    patched.save_pretrained("out/")                    # weights incl. CBAM; the recipe in config.json
    again = from_pretrained(ResNetForImageClassification, "out/")   # the patched model, same outputs

``insert_cbam`` keeps the top-level ``PreTrainedModel`` (its class, ``config``, ``save_pretrained``,
``generate`` …) and writes the recipe into ``model.config.cbam_insert_recipe``, so
``save_pretrained`` stores it in ``config.json`` next to weights that include every CBAM tensor.
``from_pretrained(model_cls, path)`` builds ``model_cls`` from that config, replays the recipe and
loads all weights (single-file or sharded safetensors, or ``pytorch_model.bin``). Plain
``model_cls.from_pretrained(path)`` cannot know about CBAM: it builds the unpatched model and
lists the CBAM tensors as unexpected keys in its load report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CBAMInsertError

__all__ = ["CONFIG_KEY", "from_pretrained", "record_recipe"]

CONFIG_KEY = "cbam_insert_recipe"
"""The ``config.json`` entry that holds a patched model's recipe."""


def _is_hf_config(config: Any) -> bool:
    return hasattr(config, "to_json_string") and hasattr(config, "save_pretrained") and hasattr(config, "to_dict")


def record_recipe(model: nn.Module) -> None:
    """Put ``model.cbam_recipe`` into ``model.config`` when the model is a transformers model."""
    config = getattr(model, "config", None)
    recipe = getattr(model, "cbam_recipe", None)
    if isinstance(recipe, dict) and _is_hf_config(config):
        setattr(config, CONFIG_KEY, recipe)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor ``save_pretrained`` wrote in ``path``."""
    from ..load import _read_safetensors

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(_read_safetensors(path / name)[0])
        return state
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")[0]
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CBAMInsertError(f"{path}: no model.safetensors, sharded safetensors or pytorch_model.bin to load")


def from_pretrained(model_cls: Any, path: str | Path, **config_kwargs: Any) -> nn.Module:
    """The patched model that ``save_pretrained`` wrote to ``path`` (a local directory).

    ``model_cls`` is the transformers class it was (``ResNetForImageClassification`` …).
    A directory without a recipe in its config is an unpatched model: it is loaded with
    ``model_cls.from_pretrained``. Returns the model in eval mode, like transformers does.
    """
    from ..api import apply_recipe

    path = Path(path)
    if not path.is_dir():
        raise CBAMInsertError(f"{path}: not a directory written by save_pretrained")
    config = model_cls.config_class.from_pretrained(str(path), **config_kwargs)
    recipe = getattr(config, CONFIG_KEY, None)
    if recipe is None:
        return model_cls.from_pretrained(str(path), config=config)
    model = model_cls(config)
    model = apply_recipe(model, recipe, inplace=True)
    record_recipe(model)
    state = _state_dict(path)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CBAMInsertError(
            f"{path}: the weights do not fit the patched {model_cls.__name__}: {unexpected[0]} is unexpected"
        )
    bad = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CBAMInsertError(
            f"{path}: {bad[0]} has shape {tuple(state[bad[0]].shape)} in the file, {tuple(own[bad[0]].shape)} in the model"
        )
    model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state}
    missing = [k for k in own if k not in state and own[k].data_ptr() not in loaded]  # tied weights are not missing
    if missing:
        raise CBAMInsertError(
            f"{path}: the weights lack {len(missing)} tensor(s) of the patched model (e.g. {missing[0]})"
        )
    return model.eval()
