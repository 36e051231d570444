"""Saving models and exporting them: every format in ``cbam_insert.formats.FORMATS``.

``save_model(model, path, format=None)`` writes one of ``FORMATS`` (inferred from the extension
where unambiguous) through a temporary file in the target directory and a rename, so a failed or
interrupted save leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import adapter, patched
from .errors import CBAMInsertError, first_line, require
from .formats import EXTENSIONS, FORMATS, PT_VERSION, RECIPE_KEY, RECIPE_SUFFIX
from .integrations import ultralytics
from .modes import in_mode
from .recipe import Recipe, make_inputs

__all__ = ["check_output", "save_model"]


def save_model(
    model: nn.Module,
    path: str | Path,
    format: str | None = None,
    *,
    example_inputs: Any = None,
    force: bool = True,
    dynamic: bool = True,
) -> Path:
    """Save ``model`` to ``path`` in ``format`` (one of ``FORMATS``; inferred from the extension).

    * ``pt``: the whole model. A model patched by this tool is stored as its unpatched structure,
      its recipe and its weights (no pickled code); ``load_model`` rebuilds it with identical
      outputs. Other modules are pickled with ``torch.save``; a foreign ``fx.GraphModule`` is refused.
    * ``state-dict`` (``.pth``) and ``safetensors``: the weights, plus the recipe of a patched model
      (beside a ``.pth`` as ``NAME.pth.recipe.json``; in the metadata of a ``.safetensors``).
    * ``adapter`` (``.safetensors``): only the CBAM weights and the recipe (see ``cbam_insert.adapter``).
    * ``torchscript`` (``torch.jit.trace``), ``onnx`` (opset 18, torch.export-based exporter) and
      ``pt2`` (``torch.export``): the model in eval mode, captured on ``example_inputs`` (default: the
      recipe's example input, else one inferred from the first convolution). ONNX and pt2 have a
      dynamic batch, and dynamic spatial sizes where the model allows (``dynamic=False``: the
      example's shapes); ONNX names its inputs and outputs (see ``cbam_insert.export``).

    The write is atomic: a temporary file beside ``path``, renamed onto it when complete.
    ``force=False`` refuses an existing ``path``; the default ``True`` overwrites, because the CLI
    checks ``--force`` and refuses to write over its input before it calls this. Returns ``path``.
    """
    path, fmt = check_output(path, format, force=force)
    writer = _WRITERS[fmt]
    if fmt in ("onnx", "pt2"):
        writer(model, path, example_inputs, dynamic)  # type: ignore[call-arg]
    else:
        writer(model, path, example_inputs)
    return path


def check_output(
    path: str | Path, format: str | None = None, *, force: bool = True, source: str | Path | None = None
) -> tuple[Path, str]:
    """Check that ``path`` can be written in ``format`` before any work is done: the format is known
    (or follows from the extension), the directory exists, ``path`` is not a directory, not the
    ``source`` file, and (unless ``force``) does not exist. Returns the path and the format."""
    path = Path(path)
    if path.is_dir():
        raise CBAMInsertError(f"output {path} is a directory; give a file name")
    fmt = _resolve_format(path, format)
    if source is not None and Path(source).exists() and _same_file(path, Path(source)):
        raise CBAMInsertError(f"output {path} is the input file; choose another -o")
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise CBAMInsertError(f"output directory {path.parent} {what}")
    if path.exists() and not force:
        raise CBAMInsertError(f"output {path} exists; pass --force to overwrite it")
    if fmt == "state-dict":  # the recipe goes beside the weights: the same rules for that file
        side = _sidecar(path)
        if source is not None and Path(source).exists() and _same_file(side, Path(source)):
            raise CBAMInsertError(f"output {path} would write its recipe over the input file {side}; choose another -o")
        if side.is_dir():
            raise CBAMInsertError(f"{side} (where the recipe of {path.name} goes) is a directory")
        if side.exists() and not force:
            raise CBAMInsertError(f"{side} (the recipe beside {path.name}) exists; pass --force to overwrite it")
    return path, fmt


def _same_file(a: Path, b: Path) -> bool:
    try:
        return (a.exists() and b.exists() and os.path.samefile(a, b)) or a.resolve() == b.resolve()
    except OSError:
        return False


def _resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise CBAMInsertError(f"unknown format: --format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    if path.name.lower().endswith(".adapter.safetensors"):
        return "adapter"
    guess = EXTENSIONS.get(path.suffix.lower())
    if guess is None:
        known = ", ".join(f"{ext}={f}" for ext, f in EXTENSIONS.items())
        raise CBAMInsertError(
            f"cannot tell the format from {path.name!r}; pass --format ({', '.join(FORMATS)}) or use an extension ({known})"
        )
    return guess


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + RECIPE_SUFFIX)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On any failure (an exception, KeyboardInterrupt) the temporary file is removed and ``path``
    is untouched. The file gets the usual permissions (``mkstemp`` makes it private).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _recipe(model: nn.Module) -> dict[str, Any] | None:
    recipe = getattr(model, "cbam_recipe", None)
    return recipe if isinstance(recipe, dict) else None


def _carries_code(model: nn.Module) -> bool:
    return any(isinstance(m, (fx.GraphModule, torch.jit.ScriptModule)) for m in model.modules())


def _write_pt(model: nn.Module, path: Path, example_inputs: Any) -> None:
    if ultralytics.is_yolo_model(model):  # a checkpoint dict that YOLO(path) loads
        with _atomic(path) as tmp:
            ultralytics.write_checkpoint(model, tmp)
        return
    base = model.__dict__.get("_cbam_base")
    recipe = _recipe(model)
    if base is not None and recipe is not None:
        if _carries_code(base):
            raise CBAMInsertError(
                "the model was already an fx.GraphModule or TorchScript module before patching; its structure "
                "cannot be stored without code: save it as state-dict, torchscript, onnx or pt2"
            )
        payload = {
            "cbam_insert": {"format": "pt", "version": PT_VERSION, "training": model.training},
            "base": base,
            "recipe": json.dumps(recipe),
            "state_dict": model.state_dict(),
        }
        with _atomic(path) as tmp:
            torch.save(patched.wrap(payload), tmp)
        return
    if _carries_code(model):
        raise CBAMInsertError(
            f"{type(model).__name__} holds an fx.GraphModule or TorchScript module not made by cbam-insert: "
            "pickling it would store code that runs when it is loaded; save it as state-dict, torchscript, onnx or pt2"
        )
    with _atomic(path) as tmp:
        torch.save(model, tmp)


def _write_state_dict(model: nn.Module, path: Path, example_inputs: Any) -> None:
    recipe = _recipe(model)
    side = _sidecar(path)
    with _atomic(path) as tmp:
        torch.save(model.state_dict(), tmp)
        if recipe is not None:
            with _atomic(side) as tmp_side:
                Path(tmp_side).write_text(json.dumps(recipe, indent=1), encoding="utf-8")
        elif side.exists():
            side.unlink()  # a stale recipe would be replayed on these plain weights


def _write_safetensors(model: nn.Module, path: Path, example_inputs: Any) -> None:
    require("safetensors", "saving as safetensors")
    from safetensors.torch import save_model as st_save

    recipe = _recipe(model)
    meta = {"format": "pt"} | ({RECIPE_KEY: json.dumps(recipe)} if recipe is not None else {})
    with _atomic(path) as tmp:
        st_save(model, tmp, metadata=meta)


def _export_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    from .trace import infer_example_inputs

    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    recipe = _recipe(model)
    spec = Recipe.from_json(recipe).example_inputs if recipe is not None else None
    if spec is not None:
        param = next(model.parameters(), None)
        inputs = make_inputs(spec, device=param.device if param is not None else None)
        return inputs if isinstance(inputs, tuple) else (inputs,)
    return infer_example_inputs(model)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    with in_mode(model, training=False), torch.no_grad():
        yield


def _write_torchscript(model: nn.Module, path: Path, example_inputs: Any) -> None:
    inputs = _export_inputs(model, example_inputs)
    with _eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", (torch.jit.TracerWarning, FutureWarning))
        try:
            traced = torch.jit.trace(model, inputs, check_trace=False, strict=False)
        except Exception as exc:
            raise CBAMInsertError(f"torch.jit.trace failed ({first_line(exc)}); try --format onnx or pt2") from exc
        with _atomic(path) as tmp:
            torch.jit.save(traced, tmp)


def _write_onnx(model: nn.Module, path: Path, example_inputs: Any, dynamic: bool = True) -> None:
    require("onnxscript", "ONNX export")
    from .export import export_onnx

    inputs = _export_inputs(model, example_inputs)
    with _eval_mode(model), _atomic(path) as tmp:
        export_onnx(model, tmp, inputs, dynamic=dynamic)


def _write_pt2(model: nn.Module, path: Path, example_inputs: Any, dynamic: bool = True) -> None:
    from .export import export_pt2

    inputs = _export_inputs(model, example_inputs)
    with _eval_mode(model):
        program, _ = export_pt2(model, inputs, dynamic=dynamic)
        with _atomic(path) as tmp:
            torch.export.save(program, tmp)


_WRITERS: dict[str, Callable[[nn.Module, Path, Any], None]] = {
    "pt": _write_pt,
    "state-dict": _write_state_dict,
    "safetensors": _write_safetensors,
    "adapter": lambda model, path, example_inputs: adapter.save_adapter(model, path),
    "torchscript": _write_torchscript,
    "onnx": _write_onnx,
    "pt2": _write_pt2,
}
