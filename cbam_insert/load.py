"""Loading models, safely.

``load_model(source, arch=None, trust=False)`` reads

* ``torchvision:NAME`` / ``timm:NAME``: the architecture with random weights;
* a file from ``torch.save(model)``, WITHOUT running code from the file: this package's own pickle
  interpreter (``unpickle``; docs/security.md has the rules) restores data and installed classes
  and refuses anything else with the offending references listed; ``trust=True`` (CLI ``--trust``)
  loads a file the user trusts with the full unpickler;
* this tool's own ``pt`` file (a patched model): the unpatched structure is unpickled the same safe
  way, its recipe is replayed and the weights are loaded, so no generated code is ever unpickled;
* a state dict (``.pth`` through the same interpreter, or ``.safetensors``) together with
  ``arch="torchvision:NAME"``. When the weights carry a recipe (safetensors metadata, or the JSON file
  ``NAME.pth.recipe.json`` beside a ``.pth``) the patched model is rebuilt by replaying it.

TorchScript archives, ``torch.export`` programs and ONNX files are refused with what to give instead
(they are compiled graphs, not modules that can be patched).

Whatever the file holds, ``load_model`` raises only ``CBAMInsertError``, with one line in which
names from the file are escaped, and every size the file controls is bounded before it is allocated.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapter
from .errors import CBAMInsertError, escape, first_line, require
from .formats import ARCH_HINT, PT_VERSION, RECIPE_KEY, RECIPE_SUFFIX, is_spec
from .integrations import ultralytics
from .recipe import Recipe
from .specs import build_arch
from .unpickle import unpickle

__all__ = ["load_model"]

MAX_RECIPE_BYTES = 4 << 20
"""A recipe read from a file (JSON) is at most this long."""
_MARKERS = ("_cbam_base", "cbam_recipe", "cbam_report")
"""This tool's in-memory attributes of a patched model: never taken from a plain pickle."""


def load_model(source: str | Path, arch: str | nn.Module | None = None, trust: bool = False) -> nn.Module:
    """Load a model from a spec or a file (see the module docstring for what is accepted).

    ``arch`` (``"torchvision:NAME"``, ``"timm:NAME"`` or a freshly built module) is the
    architecture a state-dict file's weights go into. ``trust=True`` unpickles a ``torch.save``
    file with the full unpickler, which can run code from the file: only for files you trust.
    Raises ``CBAMInsertError`` with a one-line message for anything that cannot be loaded.
    """
    try:
        return _load(source, arch, trust)
    except CBAMInsertError as exc:
        text = str(exc)
        clean = escape(" ".join(text.split()), limit=2000)
        if clean == text:
            raise
        raise CBAMInsertError(clean) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # any bad file is one line, whatever it made fail
        raise CBAMInsertError(
            f"{escape(source)}: cannot be loaded ({type(exc).__name__}: {escape(first_line(exc))})"
        ) from exc


def _load(source: str | Path, arch: str | nn.Module | None, trust: bool) -> nn.Module:
    text = str(source)
    if is_spec(text):
        if arch is not None:
            raise CBAMInsertError(f"{text} is already an architecture; --arch goes with a weights file")
        return build_arch(text)
    path = Path(source)
    if not path.exists():
        lib, sep, name = text.partition(":")
        if sep and len(lib) > 1 and lib.isidentifier() and name and not any(c in name for c in "/\\"):
            raise CBAMInsertError(f"{text}: no such file, and {lib!r} is not a model library; use torchvision:NAME or timm:NAME")
        raise CBAMInsertError(f"{path}: no such file")
    if path.is_dir():
        raise CBAMInsertError(f"{path}: is a directory, expected a model file")
    kind = _sniff(path)
    if kind == "safetensors":
        if adapter.is_adapter(path):
            return adapter.load_adapter(path, arch)
        state, recipe = _read_safetensors(path)
        model = _weights_into(arch, state, recipe, path, trust)
    else:
        model = _from_object(unpickle(path, kind, trust), path, arch, trust)
    return model


def _sniff(path: Path) -> str:
    """``zip`` (torch.save), ``legacy`` (old torch.save), ``safetensors``; other formats raise."""
    size = path.stat().st_size
    if size == 0:
        raise CBAMInsertError(f"{path}: is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise CBAMInsertError(f"{path}: truncated or corrupt (a damaged zip archive)") from None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise CBAMInsertError(
                f"{path}: a TorchScript archive, a compiled graph that cannot be patched; give the original "
                f"model (a torch.save file, or {ARCH_HINT} with its weights)"
            )
        if any(n.endswith("/archive_format") or "/models/" in n for n in names):
            raise CBAMInsertError(
                f"{path}: a torch.export program (.pt2), which cannot be patched; give the original model "
                f"(a torch.save file, or {ARCH_HINT} with its weights)"
            )
        return "zip"
    if path.suffix == ".safetensors" or (head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size):
        return "safetensors"
    if path.suffix == ".onnx" or head.startswith(b"\x08"):
        raise CBAMInsertError(
            f"{path}: an ONNX model, which cannot be patched; give the PyTorch model (a torch.save file, "
            f"or {ARCH_HINT} with its weights)"
        )
    if head.startswith(b"\x80"):
        return "legacy"
    raise CBAMInsertError(
        f"{path}: not a model file this tool reads (expected a torch.save file, a state dict (.pth) or .safetensors)"
    )


def _from_object(obj: Any, path: Path, arch: str | nn.Module | None, trust: bool = False) -> nn.Module:
    if isinstance(obj, dict) and isinstance(obj.get("cbam_insert"), dict):
        if arch is not None:
            raise CBAMInsertError(f"{path}: holds a whole patched model; drop --arch")
        return _rebuild(obj, path, trust)
    if ultralytics.is_yolo_checkpoint(obj):
        if arch is not None:
            raise CBAMInsertError(f"{path}: an Ultralytics checkpoint holds its model; drop --arch")
        model = ultralytics.from_checkpoint(obj)
        _drop_markers(model)
        _check_layers(model, path)
        return model
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise CBAMInsertError(f"{path}: holds a whole model; drop --arch")
        _drop_markers(obj)
        _check_layers(obj, path)
        return obj
    state = _as_state_dict(obj)
    if state is not None:
        if arch is None:
            raise CBAMInsertError(
                f"{path}: holds only a state dict ({len(state)} tensors), no architecture; give it with {ARCH_HINT}"
            )
        return _weights_into(arch, state, _sidecar_recipe(path), path, trust)
    if isinstance(obj, torch.Tensor):
        raise CBAMInsertError(f"{path}: holds a single tensor of shape {tuple(obj.shape)}, not a model or a state dict")
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        raise CBAMInsertError(
            f"{path}: holds a dict ({keys}{', …' if len(obj) > 5 else ''}) that is neither a model nor a state dict "
            f"(a state dict maps parameter names to tensors)"
        )
    raise CBAMInsertError(f"{path}: holds a {type(obj).__name__}, not a model or a state dict")


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """``obj`` itself, or a training checkpoint's ``state_dict`` / ``model_state_dict`` / ``model`` entry."""

    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if is_state(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if is_state(obj.get(key)):
                return obj[key]
    return None


def _drop_markers(model: nn.Module) -> None:
    """Forget ``_cbam_base`` / ``cbam_recipe`` / ``cbam_report`` a plain pickle carries: a file could
    plant them to make the tool save a structure other than the one it reports on."""
    for mod in model.modules():
        for key in _MARKERS:
            mod.__dict__.pop(key, None)


def _check_layers(model: nn.Module, path: Path) -> None:
    """torch.nn layers whose declared sizes contradict their weights are a crafted file's lie: the
    sizes are what the tool allocates from (an inferred input of ``in_channels`` channels)."""
    for name, mod in model.named_modules():
        weight = mod._parameters.get("weight") if "_parameters" in mod.__dict__ else None
        want: tuple[int, ...] | None = None
        if isinstance(mod, nn.modules.conv._ConvNd):
            ints = (mod.in_channels, mod.out_channels, mod.groups, *mod.kernel_size)
            if not all(type(v) is int and v > 0 for v in ints) or mod.in_channels % mod.groups:
                raise _lie(path, name, mod, "channels, groups or kernel_size")
            k = tuple(mod.kernel_size)
            want = ((mod.in_channels, mod.out_channels // mod.groups, *k) if mod.transposed
                    else (mod.out_channels, mod.in_channels // mod.groups, *k))  # fmt: skip
        elif isinstance(mod, nn.Linear):
            want = (mod.out_features, mod.in_features)
        elif isinstance(mod, nn.modules.batchnorm._NormBase) and mod.affine:
            want = (mod.num_features,)
        elif isinstance(mod, nn.GroupNorm) and mod.affine:
            want = (mod.num_channels,)
        elif isinstance(mod, nn.Embedding):
            want = (mod.num_embeddings, mod.embedding_dim)
        if want is not None and isinstance(weight, torch.Tensor) and tuple(weight.shape) != want:
            raise _lie(path, name, mod, f"sizes {want} but its weight has shape {tuple(weight.shape)}")


def _lie(path: Path, name: str, mod: nn.Module, what: str) -> CBAMInsertError:
    return CBAMInsertError(
        f"{path}: module {escape(name) or '<model>'} ({type(mod).__name__}) declares {what}: a damaged or crafted file"
    )


def _parse_recipe(text: Any, where: str) -> Any:
    """JSON text from a file as a recipe dict: bounded in size, nesting errors as one line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise CBAMInsertError(f"{where}: the recipe is not JSON text")
    if len(text) > MAX_RECIPE_BYTES:
        raise CBAMInsertError(f"{where}: the recipe is {len(text)} bytes, more than the {MAX_RECIPE_BYTES} allowed")
    try:
        return json.loads(text)
    except RecursionError:
        raise CBAMInsertError(f"{where}: the recipe is nested too deeply") from None
    except ValueError as exc:
        raise CBAMInsertError(f"{where}: the recipe is not valid JSON ({escape(first_line(exc))})") from None


def _sidecar_recipe(path: Path) -> dict[str, Any] | None:
    side = path.with_name(path.name + RECIPE_SUFFIX)
    if not side.is_file():
        return None
    try:
        if side.stat().st_size > MAX_RECIPE_BYTES:
            raise CBAMInsertError(f"{side}: a recipe larger than {MAX_RECIPE_BYTES} bytes")
        text = side.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CBAMInsertError(f"{side}: not a readable recipe ({first_line(exc)})") from exc
    return _parse_recipe(text, f"{side}: not a readable recipe;")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    require("safetensors", "reading .safetensors")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    except Exception as exc:
        raise CBAMInsertError(f"{path}: truncated or corrupt safetensors file ({first_line(exc)})") from exc
    for alias, kept in meta.items():  # tied weights that safetensors.torch.save_model stored once
        if alias not in state and kept in state:
            state[alias] = state[kept]
    recipe = None
    if RECIPE_KEY in meta:
        recipe = _parse_recipe(meta[RECIPE_KEY], f"{path}: its recipe metadata")
    return state, recipe


def _weights_into(
    arch: str | nn.Module | None,
    state: dict[str, torch.Tensor],
    recipe: dict[str, Any] | None,
    path: Path,
    trust: bool = False,
) -> nn.Module:
    if arch is None:
        raise CBAMInsertError(
            f"{path}: holds only weights ({len(state)} tensors), no architecture; give it with {ARCH_HINT}"
        )
    model = build_arch(arch) if isinstance(arch, str) else arch
    if recipe is not None:
        model = _replay(model, recipe, path, trust)
    _load_state(model, state, path, recipe is not None)
    return model


_INSERTED = re.compile(r"(^|\.)(cbam|se|eca|coord|simam|bam|gam|triplet|attn)_[^.]+\.")
"""A state-dict key inside a module this tool inserts (``layer1.0.cbam_add.…``, ``layer1.0.se_add.…``)."""


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, has_recipe: bool) -> None:
    """``load_state_dict(strict=True)`` with the mismatch said in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        hint = ""
        if not has_recipe and any(_INSERTED.search(k) for k in unexpected):
            hint = (f"; the weights hold attention modules but no recipe was found (safetensors metadata, or "
                    f"{path.name}{RECIPE_SUFFIX} beside the file)")  # fmt: skip
        elif not has_recipe and all(k.startswith("module.") for k in unexpected):
            hint = "; the keys start with 'module.' (saved from DataParallel): strip that prefix"
        raise CBAMInsertError(
            f"{path}: the weights do not fit {type(model).__name__}: {', '.join(parts)}{hint}; build the same architecture"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CBAMInsertError(
            f"{path}: the weights do not fit {type(model).__name__}: {k} has shape {tuple(state[k].shape)} "
            f"in the file, {tuple(own[k].shape)} in the model ({len(bad)} such tensors)"
        )
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtype=dtypes.pop())
    model.load_state_dict(state, strict=True)


def _rebuild(obj: dict[str, Any], path: Path, trust: bool = False) -> nn.Module:
    """A patched model from this tool's ``pt`` file: structure, recipe replayed, weights loaded."""
    info = obj["cbam_insert"]
    if info.get("format") != "pt" or not isinstance(info.get("version"), int):
        raise CBAMInsertError(f"{path}: an unknown cbam-insert file layout {info!r}")
    if info["version"] > PT_VERSION:
        raise CBAMInsertError(f"{path}: written by a newer cbam-insert (file version {info['version']}); upgrade")
    base, recipe, state = obj.get("base"), obj.get("recipe"), obj.get("state_dict")
    if not isinstance(base, nn.Module) or not isinstance(recipe, str) or _as_state_dict(state) is None:
        raise CBAMInsertError(f"{path}: a damaged cbam-insert file (base, recipe or state_dict missing)")
    _drop_markers(base)
    _check_layers(base, path)
    recipe_dict = _parse_recipe(recipe, f"{path}: a damaged cbam-insert file;")
    meta = sum(t.numel() for t in _tensors(base) if t.is_meta)
    stored = sum(t.numel() for t in state.values())
    if meta > stored:
        raise CBAMInsertError(
            f"{path}: its structure asks for {meta} parameter elements but the file stores {stored}: "
            "a damaged or crafted file"
        )
    _materialize(base)
    model = _replay(base, recipe_dict, path, trust)
    _load_state(model, state, path, True)
    model.train(bool(info.get("training", False)))
    return model


def _replay(model: nn.Module, recipe: Any, path: Path, trust: bool = False) -> nn.Module:
    """``apply_recipe`` on ``model`` in place, after checking that the file's recipe is well formed.

    A recipe comes from a file, so a malformed one is the file's fault (one line, not a traceback),
    and its example inputs are bounded: they are allocated to replay the patch. A step that builds
    a user's attention class (``"module": "pkg.mod:Class"``) runs that class's code: only with
    ``trust``.
    """
    from .api import apply_recipe

    try:
        parsed = Recipe.from_json(recipe)
        return apply_recipe(model, parsed, inplace=True, trust=trust)
    except CBAMInsertError as exc:
        raise CBAMInsertError(f"{path}: {exc}") from None


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def _materialize(model: nn.Module) -> None:
    """Give every meta-device parameter and buffer real (zero) CPU storage, in place."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[name] = nn.Parameter(torch.zeros_like(p, device="cpu"), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.zeros_like(b, device="cpu")
