"""Deployment exports with dynamic shapes: ONNX and ``torch.export`` (``.pt2``).

By default the batch dimension of every tensor input is dynamic, and so are its spatial
dimensions where the model allows it (a model that flattens a fixed-size map into a linear layer
does not): each export is tried with batch and spatial dimensions dynamic, then with the batch
alone, then with fixed shapes, and the first that succeeds is written. ``dynamic=False`` fixes every
shape to the example input's.

ONNX inputs are named ``input`` (one tensor input) or after ``forward``'s parameters, outputs
``output`` (one tensor) or ``output_0``, ``output_1``, ...; dynamic dimensions are named ``batch``,
``height``, ``width`` (``length`` for 1-D, ``depth`` for 3-D maps).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import CBAMInsertError, first_line
from .formats import ONNX_OPSET

__all__ = ["ExportResult", "export_onnx", "export_pt2"]

_SPATIAL = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}
_LEVELS = ("batch+spatial", "batch", "static")


@dataclass
class ExportResult:
    """What an export wrote: ``dynamic`` lists the dynamic dimensions (``"batch"``, ``"height"`` ...),
    empty for fixed shapes; ``input_names`` / ``output_names`` the ONNX names (empty for pt2)."""

    dynamic: list[str]
    input_names: list[str]
    output_names: list[str]


def _input_names(model: nn.Module, inputs: tuple[Any, ...]) -> list[str]:
    if len(inputs) == 1:
        return ["input"]
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    except (TypeError, ValueError):
        params = []
    if len(params) >= len(inputs):
        return [p.name for p in params[: len(inputs)]]
    return [f"input_{i}" for i in range(len(inputs))]


def _output_names(model: nn.Module, inputs: tuple[Any, ...]) -> list[str]:
    with torch.no_grad():
        out = model(*inputs)
    flat = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]


def _batched(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A batch of 2 where an input has a batch of 1: export fixes a size-1 dimension to 1."""
    return tuple(
        x.expand(2, *x.shape[1:]).contiguous()
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1
        else x
        for x in inputs
    )


def _spec(inputs: tuple[Any, ...], names: list[str], level: str) -> tuple[Any, ...] | None:
    """``dynamic_shapes`` (``Dim.AUTO`` on the batch, and on the spatial axes for ``batch+spatial``)
    for ``level``; None when the inputs are not all tensors (lists of images, dicts): those export
    with fixed shapes only."""
    from torch.export import Dim

    if level == "static":
        return (None,) * len(inputs)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return None
    return tuple(
        {axis: Dim.AUTO for axis in _labels(x, names[i], len(inputs)) if axis == 0 or level == "batch+spatial"}
        if x.dim() >= 2 else None
        for i, x in enumerate(inputs)
    )  # fmt: skip


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the progress lines and warnings the exporters print."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _levels(dynamic: bool) -> tuple[str, ...]:
    return _LEVELS if dynamic else ("static",)


def export_onnx(model: nn.Module, path: str, inputs: tuple[Any, ...], dynamic: bool = True) -> ExportResult:
    """Write ``model`` (in eval mode, no gradients, as the caller set it) as ONNX to ``path``.

    ``torch.export`` first finds which dimensions the model keeps dynamic (the ONNX exporter would
    name a dimension dynamic even where the graph fixes it); only those get a name.
    """
    names = _input_names(model, inputs)
    outputs = _output_names(model, inputs)
    example, shapes, dims = inputs, None, []
    if dynamic:
        try:
            _, found = export_pt2(model, inputs, dynamic=True)
        except CBAMInsertError:
            found = ExportResult([], [], [])
        if found.dynamic:
            example = _batched(inputs)
            shapes = tuple(
                {axis: label for axis, label in _labels(x, names[i], len(inputs)).items() if label in found.dynamic}
                if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
                for i, x in enumerate(example)
            )  # fmt: skip
            dims = found.dynamic
    try:
        with _quiet():
            torch.onnx.export(model, example, path, dynamo=True, external_data=False, opset_version=ONNX_OPSET,
                              input_names=names, output_names=outputs, dynamic_shapes=shapes, verbose=False)  # fmt: skip
    except Exception as exc:
        raise CBAMInsertError(f"ONNX export failed ({first_line(exc)}); try --format torchscript") from exc
    return ExportResult(dims, names, outputs)


def _labels(x: torch.Tensor, name: str, n_inputs: int) -> dict[int, str]:
    """Axis -> label for a tensor input: ``batch``, then its spatial axes (prefixed by the input's
    name when there are several inputs)."""
    labels = {0: "batch"}
    for j, axis in enumerate(_SPATIAL.get(x.dim() - 2, ())):
        labels[2 + j] = axis if n_inputs == 1 else f"{name}_{axis}"
    return labels


def export_pt2(model: nn.Module, inputs: tuple[Any, ...], dynamic: bool = True) -> tuple[Any, ExportResult]:
    """``torch.export.export`` of ``model`` with dynamic shapes where it allows them; the program and
    the dimensions that came out dynamic."""
    names = _input_names(model, inputs)
    errors: list[str] = []
    for level in _levels(dynamic):
        example = _batched(inputs) if level != "static" else inputs
        shapes = _spec(example, names, level)  # AUTO: dynamic where the model allows, fixed where not
        if shapes is None:
            continue
        try:
            with _quiet():
                program = torch.export.export(model, example, dynamic_shapes=shapes if level != "static" else None)
        except Exception as exc:  # noqa: BLE001 - the next, less dynamic level may export
            errors.append(first_line(exc))
            continue
        found = _dynamic_dims(program, example, names)
        if level == "batch+spatial" and set(found) - {"batch"} and not _runs_larger(program, example):
            continue  # symbolic, yet tied by a runtime check (a flatten into a linear layer)
        return program, ExportResult(found, names, [])
    raise CBAMInsertError(
        f"torch.export failed ({errors[-1] if errors else 'no input it can export'}); try --format torchscript"
    )


def _runs_larger(program: Any, inputs: tuple[Any, ...]) -> bool:
    """Whether the program runs on inputs 32 larger in every spatial dimension: export may keep a
    dimension symbolic under a runtime check that only the example's size passes."""
    larger = tuple(
        torch.zeros(*x.shape[:2], *(d + 32 for d in x.shape[2:]), dtype=x.dtype, device=x.device)
        if isinstance(x, torch.Tensor) and x.dim() > 2 else x
        for x in inputs
    )  # fmt: skip
    try:
        with torch.no_grad(), _quiet():
            program.module()(*larger)
    except Exception:  # noqa: BLE001 - any failure means the sizes are not free
        return False
    return True


def _dynamic_dims(program: Any, inputs: tuple[Any, ...], names: list[str]) -> list[str]:
    """The dimensions of the inputs that came out symbolic in ``program``."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = [n for n, spec in zip(placeholders, program.graph_signature.input_specs, strict=False)
            if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]  # fmt: skip
    found: list[str] = []
    for i, (node, x) in enumerate(zip(user, inputs, strict=False)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(x, torch.Tensor) or x.dim() < 2:
            continue
        for axis, label in _labels(x, names[i], len(inputs)).items():
            if isinstance(val.shape[axis], torch.SymInt):
                found.append(label)
    return list(dict.fromkeys(found))
