"""How a rewritten part goes back into the host model without replacing any of its objects.

A submodule that gets CBAM keeps its identity: same object, same class, same attributes,
properties and methods. Only its behaviour changes, in one of two ways:

* ``GraphForward`` — the module's ``forward`` becomes the generated code of its rewritten FX
  graphs (one per training mode, chosen on each call by ``module.training``), run with the module
  itself as ``self``. It is stored as an instance attribute, so ``type(module).forward`` is the
  original; it pickles as source code plus import lines (as ``fx.GraphModule`` does) and
  survives ``copy.deepcopy`` and ``torch.save`` / ``torch.load``.
* ``OutputCBAM`` — a forward hook that applies a child CBAM module to the module's output. Used
  where the site is a traced part's own output: the module's code is not touched at all, so a host
  that later edits it (ultralytics ``fuse()`` deletes ``bn`` and assigns ``forward``) keeps CBAM.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.package import sys_importer

__all__ = ["GraphForward", "OutputCBAM", "graph_forward", "output_hooks"]


def _compile(source: str, imports: str) -> Any:
    return _forward_from_src(imports + "\n" + source, {})


class GraphForward:
    """The forward of ``module`` rewritten as FX graphs: ``{"eval": graph}`` or eval and train.

    Calls run the graph of the module's current mode with ``self`` = the module, so the graph's
    submodule calls reach the module's own children (and anything later put in their place).
    """

    def __init__(self, module: nn.Module, sources: dict[str, tuple[str, str]]) -> None:
        self.module = module
        self.sources = sources  # mode -> (python source of ``forward``, import block)
        self._fns = {mode: _compile(src, imports) for mode, (src, imports) in sources.items()}
        sig = inspect.signature(self._fns["eval"])
        self.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])

    @classmethod
    def from_graphs(cls, module: nn.Module, graphs: dict[str, fx.Graph]) -> GraphForward:
        sources = {}
        for mode, graph in graphs.items():
            code = graph.python_code(root_module="self")
            sources[mode] = (code.src, _format_import_block(code.globals, sys_importer))
        return cls(module, sources)

    def function(self, training: bool) -> Any:
        """The generated ``forward(self, ...)`` for one mode."""
        return self._fns["train" if training and "train" in self._fns else "eval"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.module.training)(self.module, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (GraphForward, (self.module, self.sources))

    def __repr__(self) -> str:
        return f"<rewritten forward of {type(self.module).__name__} ({', '.join(self.sources)} graphs)>"


def graph_forward(module: nn.Module) -> GraphForward | None:
    """The ``GraphForward`` installed on ``module``, if any."""
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, GraphForward) else None


class OutputCBAM:
    """Forward hook: ``output -> module.<name>(output)`` (a child CBAM module of the hooked module)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        return module.get_submodule(self.name)(output)

    def __repr__(self) -> str:
        return f"OutputCBAM({self.name!r})"


def output_hooks(module: nn.Module) -> list[str]:
    """Names of the child CBAM modules that ``OutputCBAM`` hooks apply to ``module``'s output, in order."""
    return [h.name for h in module._forward_hooks.values() if isinstance(h, OutputCBAM)]
