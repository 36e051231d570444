"""Parameter and FLOP accounting for a patch, latency, and the report's Rich rendering.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eval-mode forward of
the example input and reported as multiply-accumulates (MACs), torchvision's convention for
``weights.meta["_ops"]``: convolutions and matrix products are counted, attention's two
products included; norms, activations, pooling, softmax and elementwise products are not. For
CBAM with C channels, hidden width h, kernel k and an (N, C, H, W) input that gives
``N*P*2*C*h`` MACs for the shared MLP (P pooled descriptors, each through two linear layers)
plus ``N*2*k*k*H*W`` for the 2-in, 1-out spatial convolution; its gating products are
elementwise and not counted.

Example::

    >>> import torch, torchvision
    >>> from cbam_insert import insert_cbam
    >>> from cbam_insert.report import cost_report
    >>> model = torchvision.models.resnet18()
    >>> x = torch.rand(1, 3, 224, 224)
    >>> patched = insert_cbam(model, after="block", example_inputs=(x,))
    >>> cost = cost_report(model, patched, (x,))
    >>> cost.params_before, round(cost.flops_before / 1e9, 3)  # torchvision's meta: 11689512, 1.814
    (11689512, 1.814)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .attention import Attention
from .meta import meta_copy, to_meta
from .modes import in_mode
from .modules import CBAM
from .trace import _keep_image_size

if TYPE_CHECKING:
    from rich.console import RenderableType

    from .api import PatchReport
    from .sites import Site

__all__ = [
    "FLOP_NOTE",
    "BenchResult",
    "CostReport",
    "benchmark",
    "cost_report",
    "count_macs",
    "count_params",
    "counting_conditions",
    "module_tree",
    "render_bench",
    "render_report",
    "report_dict",
    "site_cost",
    "site_latency",
]

FLOP_NOTE = (
    "FLOPs are multiply-accumulates (MACs) of convolutions and matrix products, attention included, "
    "for one forward pass of the example input (torchvision's convention for weights.meta['_ops']); "
    "norms, activations, pooling and elementwise products are not counted"
)

_aten = torch.ops.aten


def _cpu_sdpa_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU attention kernel, which FlopCounterMode does not know: ``q @ k^T`` and
    ``attn @ v`` over (batch, heads, length, dim) shapes, 2 FLOPs per multiply-accumulate."""
    *lead, s_q, d = query
    s_k = key[-2]
    d_v = value[-1]
    batch = 1
    for n in lead:
        batch *= n
    return 2 * batch * s_q * s_k * (d + d_v)


_EXTRA_FLOP_FORMULAS = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_params(model: nn.Module) -> int:
    """Number of parameters, each shared tensor counted once."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())


def count_macs(
    model: nn.Module, example_inputs: tuple[Any, ...], *, on_meta: bool = True
) -> tuple[int, dict[str, int]]:
    """Total MACs of one eval-mode forward, and MACs per CBAM module (by qualified name).

    Only shapes matter, so by default the forward runs on a copy of the model whose parameters,
    buffers and inputs are on the meta device: no arithmetic, no memory, the same counts. Models
    whose forward needs values (data-dependent control flow, ``.item()``, NMS) are counted on
    their real tensors instead.
    """
    if on_meta and not any(p.is_meta for p in model.parameters()):
        counted = _count_on_meta(model, example_inputs)
        if counted is not None:
            return counted
    return _count(model, example_inputs)


def _count_on_meta(model: nn.Module, example_inputs: tuple[Any, ...]) -> tuple[int, dict[str, int]] | None:
    """``_count`` on a meta copy, or None when the forward needs real values."""
    try:
        return _count(meta_copy(model), to_meta(example_inputs))
    except Exception:  # noqa: BLE001 - whatever the meta device cannot run is counted for real
        return None


def _count(model: nn.Module, example_inputs: tuple[Any, ...]) -> tuple[int, dict[str, int]]:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel is invisible to the counter
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
        with in_mode(model, training=False), counting_conditions(model, example_inputs), counter, torch.no_grad():
            model(*example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    per_module = counter.get_flop_counts()
    per_cbam = {}
    for name, key in _tracker_names(model, (CBAM, Attention)).items():
        per_cbam[name] = sum(per_module.get(key, {}).values()) // 2
    return counter.get_total_flops() // 2, per_cbam


@contextmanager
def counting_conditions(model: nn.Module, example_inputs: tuple[Any, ...]) -> Iterator[list[str]]:
    """Hold the work of a forward that depends on values, not shapes, fixed while it is counted;
    yield what was held, in words (empty for most models).

    torchvision's two-stage detectors run their box head (and mask or keypoint head) on however
    many proposals survive score thresholds and NMS, a number that random weights move from run
    to run and that a patch moves too: while counting, those filters are held off, so the heads
    run at their configured capacity (``post_nms_top_n`` proposals, ``detections_per_img``
    detections) and the count depends on shapes only. Their detection transform keeps the example
    image's size, the size the sites were traced at, instead of resizing it (to 800 px by default).
    """
    held: list[str] = []
    saved: list[tuple[nn.Module, dict[str, Any]]] = []
    for mod in model.modules():
        kind = type(mod).__name__
        if kind == "GeneralizedRCNNTransform":
            resized = _resized(mod, example_inputs)
            if resized is not None:
                held.append(f"image kept at {resized[0]} (the model's transform would resize it to {resized[1]})")
        if kind == "RegionProposalNetwork":
            new = {"min_size": 0.0, "score_thresh": 0.0, "nms_thresh": 1.0}
            held.append(f"proposals at capacity: {mod.post_nms_top_n()} per image (score filter and NMS held off)")
        elif kind == "RoIHeads":
            new = {"score_thresh": -1.0, "nms_thresh": 1.0}
            held.append(f"detections at capacity: {mod.detections_per_img} per image (score filter and NMS held off)")
        else:
            continue
        saved.append((mod, {k: getattr(mod, k) for k in new}))
        for k, v in new.items():
            setattr(mod, k, v)
    restore = _keep_image_size(model, example_inputs)
    try:
        yield held
    finally:
        restore()
        for mod, old in saved:
            for k, v in old.items():
                setattr(mod, k, v)


def _resized(transform: nn.Module, example_inputs: tuple[Any, ...]) -> tuple[str, str] | None:
    """(the example image's size, the size ``transform`` would resize it to) when they differ."""
    first = example_inputs[0] if example_inputs else None
    image = first[0] if isinstance(first, list) and first else first
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or transform.fixed_size is not None:
        return None
    h, w = (int(d) for d in image.shape[-2:])
    scale = min(transform.min_size[-1] / min(h, w), transform.max_size / max(h, w))
    to = (math.floor(h * scale), math.floor(w * scale))
    return None if to == (h, w) else (f"{h}x{w}", f"{to[0]}x{to[1]}")


def _tracker_names(model: nn.Module, kind: type | tuple[type, ...]) -> dict[str, str]:
    """``{qualified name: FlopCounterMode key}`` for the submodules of type ``kind``.

    The counter's module tracker names the root by its class and every other module by the path
    it was first reached on, ``"ResNet.layer1.0.cbam_add"``, whatever GraphModule or plain
    container holds it.
    """
    root = type(model).__name__
    return {name: f"{root}.{name}" for name, mod in model.named_modules() if isinstance(mod, kind) and name}


@dataclass
class CostReport:
    """Before/after parameters and MACs, in total and per inserted CBAM module."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    per_module: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (params, macs)
    held: list[str] = field(default_factory=list)  # what ``counting_conditions`` held fixed, in words

    @property
    def params_delta(self) -> int:
        return self.params_after - self.params_before

    @property
    def flops_delta(self) -> int:
        return self.flops_after - self.flops_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": {"before": self.params_before, "after": self.params_after, "delta": self.params_delta,
                       "percent": _pct(self.params_before, self.params_after)},
            "flops": {"before": self.flops_before, "after": self.flops_after, "delta": self.flops_delta,
                      "percent": _pct(self.flops_before, self.flops_after), "unit": "MACs", "counted": FLOP_NOTE,
                      "held": list(self.held)},
        }  # fmt: skip


def _pct(before: int, after: int) -> float:
    return round(100.0 * (after - before) / before, 4) if before else 0.0


def cost_report(
    original: nn.Module, patched: nn.Module, example_inputs: tuple[Any, ...], modules: Iterable[str] | None = None
) -> CostReport:
    """Count parameters and MACs of both models on the same example input.

    ``per_module`` covers ``modules`` (default: every CBAM module of ``patched``), e.g. the
    ``PatchReport.modules`` a patch added.
    """
    before, _ = count_macs(original, example_inputs)
    after, per_cbam = count_macs(patched, example_inputs)
    named = dict(patched.named_modules())
    names = list(per_cbam) if modules is None else [n for n in modules if n in named]
    per_module = {n: (count_params(named[n]), per_cbam.get(n, 0)) for n in names}
    # the conditions of the eval-mode forward that was counted
    with in_mode(patched, training=False), counting_conditions(patched, example_inputs) as held:
        pass
    return CostReport(count_params(original), count_params(patched), before, after, per_module, held)


def site_cost(site: Site, cost: CostReport) -> tuple[str, int, int] | None:
    """(module name, params, MACs) of the CBAM module added at a used site: the site's planned
    name, or the newest ``name_<k>`` when an earlier patch took that name."""
    if not site.used:
        return None
    base = site.module_name
    names = [n for n in cost.per_module if n == base or (n.startswith(base + "_") and n[len(base) + 1 :].isdigit())]
    if not names:
        return None
    name = max(names, key=lambda n: (len(n), n))
    return (name, *cost.per_module[name])


# ----------------------------------------------------------------------------- latency


SPREAD_WARNING = 1.2  # max/min over the rounds above which --bench warns that the timings are noisy


@dataclass
class BenchResult:
    """Latency, in seconds, of the original and the patched model on one input: every round's
    time, their medians (``original``, ``patched``) and their spread."""

    original_times: list[float]
    patched_times: list[float]
    device: str
    per_site: dict[str, float] = field(default_factory=dict)  # module name -> its own median latency, seconds

    @property
    def runs(self) -> int:
        return len(self.original_times)

    @property
    def original(self) -> float:
        return statistics.median(self.original_times)

    @property
    def patched(self) -> float:
        return statistics.median(self.patched_times)

    @property
    def ratio(self) -> float:
        """Median patched / median original."""
        return self.patched / self.original if self.original else float("nan")

    @property
    def spread(self) -> float:
        """The larger of the two models' max/min over the rounds (1.0: every round the same)."""
        return max(max(t) / min(t) if min(t) > 0 else float("inf") for t in (self.original_times, self.patched_times))

    @property
    def warning(self) -> str | None:
        """A sentence when the rounds disagree by more than ``SPREAD_WARNING``, else None."""
        if self.spread <= SPREAD_WARNING:
            return None
        return (
            f"the rounds vary by up to {self.spread:.2f}x (max/min): the machine was busy or the runs too short, "
            "so the ratio is uncertain; rerun on an idle machine"
        )

    def to_dict(self) -> dict[str, Any]:
        def ms(times: list[float]) -> dict[str, float]:
            return {k: round(v * 1e3, 4) for k, v in zip(("min", "median", "max"), _min_med_max(times))}

        return {"original_ms": round(self.original * 1e3, 4), "patched_ms": round(self.patched * 1e3, 4),
                "ratio": round(self.ratio, 4), "runs": self.runs, "device": self.device,
                "original": ms(self.original_times), "patched": ms(self.patched_times),
                "spread": round(self.spread, 4), "warning": self.warning,
                "per_site_ms": {k: round(v * 1e3, 4) for k, v in self.per_site.items()}}  # fmt: skip


def _min_med_max(times: Sequence[float]) -> tuple[float, float, float]:
    return min(times), statistics.median(times), max(times)


def benchmark(
    original: nn.Module, patched: nn.Module, example_inputs: tuple[Any, ...], runs: int = 20, budget_s: float = 20.0
) -> BenchResult:
    """Eval-mode forward latency of both models over ``runs`` rounds, interleaved so drift hits both.

    Stops early after ``budget_s`` seconds (at least 3 runs each).
    """
    device = _device_of(patched)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(model: nn.Module) -> float:
        sync()
        t0 = time.perf_counter()
        model(*example_inputs)
        sync()
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {0: [], 1: []}
    models = (original, patched)
    with in_mode(*models, training=False), torch.inference_mode():
        for m in models:  # warm-up
            once(m)
        start = time.perf_counter()
        for i in range(runs):
            for k, m in enumerate(models):
                times[k].append(once(m))
            if i >= 2 and time.perf_counter() - start > budget_s:
                break
    return BenchResult(times[0], times[1], str(device))


def site_latency(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    modules: Sequence[str],
    runs: int = 20,
    budget_s: float = 10.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median eval-mode latency of each inserted module alone, on the tensor it receives in one
    forward of ``example_inputs``: the time that site adds. Modules are timed interleaved, each on
    a fresh copy of its input (a module that writes into its input then sees the same values)."""
    named = dict(model.named_modules())
    captured: dict[str, tuple[Any, ...]] = {}
    hooks = [
        named[n].register_forward_pre_hook(lambda _m, args, n=n: captured.setdefault(n, args) and None)
        for n in modules if n in named
    ]  # fmt: skip
    was = model.training
    device = _device_of(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in modules if n in named}
    try:
        model.eval()
        with torch.inference_mode():
            model(*example_inputs)
            for h in hooks:
                h.remove()
            hooks = []
            start = time.perf_counter()
            for i in range(runs + 1):  # the first round warms up
                for name, got in times.items():
                    if name not in captured:
                        continue
                    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in captured[name])
                    sync()
                    t0 = clock()
                    named[name](*args)
                    sync()
                    if i:
                        got.append(clock() - t0)
                if i >= 3 and time.perf_counter() - start > budget_s:
                    break
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {n: statistics.median(t) for n, t in times.items() if t}


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- rendering


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f}"


def _signed(n: int) -> str:
    return f"+{n:,}" if n >= 0 else f"{n:,}"


def _spatial(site: Site) -> tuple[int, ...]:
    """The spatial size of a channels-first site; none for a tensor whose dim 1 is not a channel
    axis, such as a token tensor (N, L, D), whose trailing dims are no spatial size."""
    return site.spatial if site.channels else ()


def _site_rows(
    report: PatchReport, cost: CostReport | None, show_skipped: bool
) -> list[tuple[Site, tuple[str, int, int] | None]]:
    return [(s, site_cost(s, cost) if cost else None) for s in report.sites if s.used or show_skipped]


def render_report(
    report: PatchReport,
    cost: CostReport | None,
    *,
    model: nn.Module | None = None,
    show_skipped: bool = False,
    inputs: str | None = None,
) -> list[RenderableType]:
    """The report as Rich renderables: the sites table, the totals table, the module tree of
    the CBAM modules (when ``model``, the patched model, is given) and what FLOPs count.

    ``show_skipped`` adds the skipped sites with the reason (the dry run's view).
    """
    from rich.table import Table
    from rich.text import Text

    out: list[RenderableType] = []
    used = len(report.used)
    skipped = len(report.sites) - used
    kind = "CBAM" if report.module == "cbam" else report.module
    title = f"{kind} sites for --after {report.after}: {used} used, {skipped} skipped"
    table = Table(title=title, title_justify="left")
    table.add_column("site", overflow="fold")
    table.add_column("kind")
    table.add_column("channels", justify="right")
    table.add_column("spatial", justify="right")
    table.add_column("params +", justify="right")
    table.add_column("MACs +", justify="right")
    if show_skipped:
        table.add_column("used / reason", overflow="fold")
    for site, sc in _site_rows(report, cost, show_skipped):
        row = [
            site.name,
            site.kind,
            str(site.channels) if site.channels else "-",
            "x".join(map(str, _spatial(site))) or "-",
            f"{sc[1]:,}" if sc else "-",
            f"{sc[2]:,}" if sc else "-",
        ]
        if show_skipped:
            row.append((f"used: {site.reason}" if site.reason else "used") if site.used else f"skipped: {site.reason}")
        table.add_row(*row)
    out.append(table)
    if skipped and not show_skipped:
        out.append(Text(f"{skipped} site(s) skipped; --dry-run lists them with the reason", style="dim"))
    if cost is not None:
        totals = Table(title="Totals", title_justify="left")
        for col in ("", "before", "after", "delta", "%"):
            totals.add_column(col, justify="right" if col else "left")
        totals.add_row("params", f"{cost.params_before:,}", f"{cost.params_after:,}", _signed(cost.params_delta),
                       f"{_pct(cost.params_before, cost.params_after):+.3f}%")  # fmt: skip
        totals.add_row("FLOPs (MACs)", _human(cost.flops_before), _human(cost.flops_after),
                       ("+" if cost.flops_delta >= 0 else "") + _human(cost.flops_delta),
                       f"{_pct(cost.flops_before, cost.flops_after):+.3f}%")  # fmt: skip
        out.append(totals)
    if model is not None and report.modules:
        out.append(module_tree(model, report.modules, cost))
    if report.untraced:
        lines = "".join(f"\n  {path or '<model>'}: {why}" for path, why in report.untraced)
        out.append(Text(f"not traced (left as they are):{lines}", style="yellow"))
    if cost is not None:
        note = FLOP_NOTE + (f"; input {inputs}" if inputs else "") + "."
        out.append(Text(note, style="dim"))
        if cost.held:
            out.append(Text(f"held while counting: {'; '.join(cost.held)}.", style="dim"))
    return out


def module_tree(model: nn.Module, modules: Sequence[str], cost: CostReport | None = None) -> Any:
    """A Rich tree of the module hierarchy down to each CBAM module, parents named by class."""
    from rich.text import Text
    from rich.tree import Tree

    tree = Tree(Text(type(model).__name__, style="bold"))
    nodes: dict[str, Any] = {"": tree}
    named = dict(model.named_modules())
    for name in modules:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            if path in nodes:
                continue
            parent = nodes[".".join(parts[: depth - 1])]
            mod = named.get(path)
            cls = type(mod).__name__ if mod is not None else "?"
            if depth == len(parts):
                extra = ""
                if cost is not None and name in cost.per_module:
                    p, m = cost.per_module[name]
                    extra = f"  +{p:,} params, +{m:,} MACs"
                label = Text.assemble((parts[-1], "bold green"), f" ({cls})", (extra, "dim"))
            else:
                label = Text(f"{parts[depth - 1]} ({cls})")
            nodes[path] = parent.add(label)
    return tree


def render_bench(bench: BenchResult) -> Any:
    """A small table: min, median and max latency over the rounds of the original and the patched
    model, the ratio of the medians, and a warning line when the rounds disagree."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Latency on {bench.device} ({bench.runs} rounds)", title_justify="left")
    table.add_column("")
    for col in ("min", "median", "max"):
        table.add_column(col, justify="right")
    for label, times in (("original", bench.original_times), ("patched", bench.patched_times)):
        table.add_row(label, *(f"{t * 1e3:.3f} ms" for t in _min_med_max(times)))
    table.add_row("ratio", f"{min(bench.patched_times) / min(bench.original_times):.3f}x", f"{bench.ratio:.3f}x", "",
                  style="bold")  # fmt: skip
    parts: list[Any] = [table]
    if bench.warning is not None:
        parts.append(Text(f"warning: {bench.warning}", style="yellow"))
    if bench.per_site:
        sites = Table(title="Added latency per site (each module alone on its input, median)", title_justify="left")
        sites.add_column("module", overflow="fold")
        sites.add_column("latency", justify="right")
        for name, t in bench.per_site.items():
            sites.add_row(name, f"{t * 1e3:.3f} ms")
        sites.add_row("sum", f"{sum(bench.per_site.values()) * 1e3:.3f} ms", style="bold")
        parts.append(sites)
    return parts[0] if len(parts) == 1 else Group(*parts)


def report_dict(
    report: PatchReport,
    cost: CostReport | None,
    *,
    output: str | None = None,
    inputs: Any = None,
    bench: BenchResult | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """The report as plain JSON data (the CLI's ``--json``); counts are integers."""
    sites = []
    for s in report.sites:
        entry = s.to_dict()
        sc = site_cost(s, cost) if cost else None
        entry["spatial"] = list(_spatial(s)) if s.channels else None
        if sc:
            entry["module"], entry["params"], entry["flops"] = sc
        else:
            entry["params"] = entry["flops"] = None
        sites.append(entry)
    data: dict[str, Any] = {
        "module": report.module,
        "after": report.after,
        "sites": sites,
        "used": len(report.used),
        "skipped": len(report.sites) - len(report.used),
    }
    if cost is not None:
        data.update(cost.to_dict())
    else:
        data.update({"params": None, "flops": None})
    data.update({
        "modules": list(report.modules),
        "traced": list(report.traced),
        "untraced": [{"path": p, "reason": r} for p, r in report.untraced],
        "input": inputs,
        "bench": bench.to_dict() if bench else None,
        "dry_run": dry_run,
        "output": output,
    })  # fmt: skip
    return data
