"""Time and measure cbam_insert.CBAM against the reference CBAM and timm's CbamModule.

Run from the repository root::

    python benchmarks/bench_module.py            # full run: four ResNet-50-like shapes
    python benchmarks/bench_module.py --quick    # a few seconds: tiny shapes, 2 repetitions

What is measured, per shape (N, C, H, W), on the CPU (or ``--device cuda``, ``--dtype bfloat16``):

* ``fwd``: one inference forward (``eval()``, ``torch.no_grad()``).
* ``fwd+bwd``: one training step of the module alone (``train()``, the input requires grad,
  ``out.backward(g)`` with a fixed random ``g``), parameter gradients included.
* ``peak MB``: the most bytes held at once by tensors *created* during one fwd+bwd (activations
  kept for backward, temporaries, the output, every gradient), counted by a dispatch mode that
  sees each new storage and a weak reference that sees it freed. The input and the parameters
  are not counted (they exist either way). This is the module's own share of training memory.
* ``saved MB``: bytes kept between forward and backward (``saved_tensors_hooks``), the part
  that accumulates over the depth of a network; the input and the parameters are not counted.

Times are medians over interleaved repetitions (every implementation runs once per round, in
an order shuffled each round, so drifting machine load and the allocator state one leaves
behind hit all of them alike). With one intra-op thread (the default)
the clock is the benchmark thread's CPU time, which other processes on a shared machine do not
inflate; with more threads it is wall time; on a GPU it is wall time with the device synchronised
before and after each call. Ratios are to the reference CBAM.

The reference CBAM (``benchmarks/_reference.py``) is the straightforward formulation of the
paper's equations: AdaptiveAvgPool2d and AdaptiveMaxPool2d, two bias-free 1x1 convolutions
applied to each descriptor separately, ``torch.mean`` / ``torch.max`` over channels,
``torch.cat``, a bias-free k x k convolution and sigmoids. It gets the same weights as the
cbam_insert module, and the two outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _reference import ReferenceCBAM

from cbam_insert import CBAM, CBAMInsertError, native

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_SHAPES = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 2048, 7, 7), (1, 256, 56, 56)]
QUICK_SHAPES = [(2, 64, 14, 14), (2, 128, 7, 7)]


def timm_cbam(channels: int) -> nn.Module | None:
    """timm's CbamModule (its spatial conv is followed by a BatchNorm), or None without timm."""
    try:
        from timm.layers.cbam import CbamModule
    except ImportError:
        return None
    return CbamModule(channels)


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created under it until they are freed; remembers the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # a view, ``out=`` or in-place result shares an input's storage: nothing new was allocated
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._sizes and key not in inputs:
                    self._sizes[key] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def training_memory(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[int, int]:
    """(peak bytes created during one fwd+bwd, bytes saved for backward), input not counted."""
    module.train()
    module.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_()
    saved: dict[int, int] = {}
    exclude = {xg.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with LiveBytes() as live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(xg)
        out.backward(grad)
        del out
    module.zero_grad(set_to_none=True)
    return live.peak, sum(saved.values())


def forward_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def synced(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation, so that a wall clock sees the GPU's work."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


def train_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    xg = x.detach().requires_grad_()

    def run() -> None:
        module(xg).backward(grad)
        xg.grad = None
        module.zero_grad(set_to_none=True)

    return run


def interleaved_medians(fns: dict[str, Callable[[], None]], reps: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median milliseconds of each function; every round runs each once, in a shuffled order."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_shape(
    shape: tuple[int, int, int, int],
    reps: int,
    clock: Callable[[], float],
    use_timm: bool,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    use_native: bool = False,
) -> dict[str, dict[str, float]]:
    device = torch.device(device)
    torch.manual_seed(0)
    channels = shape[1]
    ours = CBAM(channels)
    impls: dict[str, nn.Module] = {"reference": ReferenceCBAM.like(ours), "cbam_insert": ours}
    timm = timm_cbam(channels) if use_timm else None
    if timm is not None:
        impls["timm"] = timm
    for m in impls.values():
        m.to(device=device, dtype=dtype)
    x = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn(shape, device=device, dtype=dtype)
    with torch.no_grad():
        want = impls["reference"].eval()(x).float()
        diff = (want - ours.eval()(x).float()).abs().max().item()
    # float32: the same maths to rounding; 16-bit types round each intermediate to 8 or 11 bits
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 0.05 * max(1.0, want.abs().max().item())
    if diff > tolerance:
        raise RuntimeError(f"cbam_insert and the reference CBAM disagree on {shape}: max |diff| = {diff:g}")

    for m in impls.values():
        m.eval()
    fwd_impls = dict(impls)
    if use_native:  # inference only: training never uses the compiled kernel
        fwd_impls["cbam_insert native"] = OnNative(ours)
    fwd = interleaved_medians({k: synced(forward_fn(m, x), device) for k, m in fwd_impls.items()}, reps, clock)
    for m in impls.values():
        m.train()
    fb = interleaved_medians({k: synced(train_fn(m, x, grad), device) for k, m in impls.items()}, reps, clock)
    result: dict[str, dict[str, float]] = {}
    for name, m in impls.items():
        peak, saved = training_memory(m, x, grad)
        result[name] = {"fwd": fwd[name], "fb": fb[name], "peak": peak / 2**20, "saved": saved / 2**20}
    if use_native:
        result["cbam_insert native"] = {"fwd": fwd["cbam_insert native"]}
    return result


class OnNative(nn.Module):
    """A CBAM called with the optional compiled CPU kernel (cbam_insert.native) switched on."""

    def __init__(self, inner: CBAM) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native.enable()  # built already: this only switches it on
        try:
            return self.inner(x)
        finally:
            native.disable()


def render(results: dict[tuple[int, ...], dict[str, dict[str, float]]], markdown: bool) -> str:
    header = ["shape", "module", "fwd ms", "fwd / ref", "fwd+bwd ms", "fwd+bwd / ref", "peak MB", "saved MB"]
    rows = []
    for shape, res in results.items():
        ref = res["reference"]
        for name, r in res.items():
            if "fb" not in r:  # forward only (the native kernel)
                rows.append(["x".join(map(str, shape)), name, f"{r['fwd']:.2f}", f"{r['fwd'] / ref['fwd']:.2f}",
                             "-", "-", "-", "-"])  # fmt: skip
                continue
            rows.append([
                "x".join(map(str, shape)), name, f"{r['fwd']:.2f}", f"{r['fwd'] / ref['fwd']:.2f}",
                f"{r['fb']:.2f}", f"{r['fb'] / ref['fb']:.2f}", f"{r['peak']:.1f}", f"{r['saved']:.1f}",
            ])  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join("{:>" + str(w) + "}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"a shape is N,C,H,W (e.g. 8,256,56,56), got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> dict[tuple[int, ...], dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and 2 repetitions: a smoke run of a few seconds"
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per measurement (default 25, 2 with --quick)"
    )
    parser.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        help="N,C,H,W; repeat for several (default: 8,256,56,56 8,512,28,28 8,2048,7,7 1,256,56,56)",
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--no-timm", action="store_true", help="leave timm's CbamModule out even when it is installed")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--native",
        action="store_true",
        help="also time the forward on the optional compiled CPU kernel (cbam_insert.native; builds it on first use)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter and input dtype")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: not a device: {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: cpu or cuda, got {args.device!r}")

    if args.native and device.type != "cpu":
        parser.error("--native: the compiled kernel is for the CPU")
    if args.native:
        try:
            native.build()
        except CBAMInsertError as exc:
            parser.error(f"--native: {exc}")
    torch.set_num_threads(args.threads)
    shapes = args.shape or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    reps = args.reps or (2 if args.quick else 25)
    cpu_clock = device.type == "cpu" and args.threads == 1
    clock = time.thread_time if cpu_clock else time.perf_counter
    clock_name = "CPU time of the benchmark thread" if cpu_clock else "wall time"
    timm_note = "" if args.no_timm or timm_cbam(8) is not None else " (timm not installed)"
    where = device.type if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    print(
        f"torch {torch.__version__}, {where}, {args.dtype}, {args.threads} thread(s), {clock_name}, "
        f"median of {reps}{timm_note}"
    )
    results = {}
    for shape in shapes:
        results[shape] = bench_shape(
            shape, reps, clock, use_timm=not args.no_timm, device=device, dtype=DTYPES[args.dtype],
            use_native=args.native,
        )  # fmt: skip
    print(render(results, args.markdown))
    return results


if __name__ == "__main__":
    main()
