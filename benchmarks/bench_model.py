"""Whole-model latency of CBAM: the bare model, the reference CBAM and this project's CBAM.

torchvision ResNet-50 and MobileNet-V2 (random weights) get CBAM on every ``block`` site. The
same patched model is run twice: with this project's ``CBAM`` modules, and with each of them
replaced by ``ReferenceCBAM`` (``benchmarks/_reference.py``: the straightforward formulation of the
paper's equations, the same weights copied in). The three models are timed interleaved, in eval mode under
``torch.inference_mode()``; each round times one forward of each model in a rotating order.

Reported per configuration:

* median forward latency of each model (ms),
* added latency of each CBAM (patched − bare): the median over rounds of the paired difference
  with the bare model's forward of the same round (drift cancels),
* ratio = project's added latency / reference CBAM's added latency,
* on CPU, the median minor page faults of one forward of each model (printed, and in ``--json``):
  the part of the spread between runs that glibc returning freed memory to the kernel causes.

The same is done under ``torch.compile`` (guarded: a compile that fails or runs past
``--compile-timeout`` is skipped with the reason), and for channels-last inputs (model and input
in ``torch.channels_last``).

    python benchmarks/bench_model.py                    # CPU, 2 threads, eager + compile
    python benchmarks/bench_model.py --quick            # smoke test: seconds
    python benchmarks/bench_model.py --device cuda --dtype bfloat16
    python benchmarks/bench_model.py --profile          # which parts of CBAM cost what
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _reference import ReferenceCBAM

from cbam_insert import CBAM, CBAMInsertError, insert_cbam, native


def build(name: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(bare, project CBAM, reference CBAM) models in eval mode, CBAM on every ``block`` site."""
    torch.manual_seed(0)
    bare = torchvision.models.get_model(name, weights=None).eval()
    project = insert_cbam(bare, after="block", seed=0).eval()
    reference = copy.deepcopy(project)
    for mod_name, mod in list(reference.named_modules()):
        if isinstance(mod, CBAM):
            reference.set_submodule(mod_name, ReferenceCBAM.like(mod))
    return bare, project, reference.eval()


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (POSIX; no limit elsewhere)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"took more than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], object]], float]:
    """A function that runs ``fn`` once and returns its time in ms.

    ``clock="wall"`` is elapsed time (CUDA synchronised); ``clock="cpu"`` is this process's CPU
    time, steadier on a busy machine and, with one thread, the compute the model needs.
    """
    if device.type == "cuda":

        def run(fn):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            return (time.perf_counter() - t0) * 1e3

        return run
    now = time.process_time if clock == "cpu" else time.perf_counter

    def run(fn):
        t0 = now()
        fn()
        return (now() - t0) * 1e3

    return run


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device, clock: str = "wall"
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Interleaved timings: each round runs every fn once, the order rotating between rounds.
    Also the minor page faults of each call (kernel time the allocator's returned memory costs)."""
    run = timer(device, clock)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            run(fns[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            f0 = _minor_faults()
            times[n].append(run(fns[n]))
            faults[n].append(_minor_faults() - f0)
    return times, faults


def summarise(times: dict[str, list[float]], faults: dict[str, list[int]] | None = None) -> dict[str, float]:
    bare = times["bare"]
    out = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
    for k in ("reference", "project", "native"):
        if k in times:
            out[f"{k}_added_ms"] = statistics.median(t - b for t, b in zip(times[k], bare))
    for k, key in (("project", "ratio"), ("native", "native_ratio")):
        if k in times:
            ref = out["reference_added_ms"]
            out[key] = out[f"{k}_added_ms"] / ref if ref > 0 else float("nan")
    for k, v in (faults or {}).items():
        out[f"{k}_faults"] = statistics.median(v)
    return out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows: list[dict] = []
    for name in args.models:
        bare, project, reference = build(name)
        models = {"bare": bare, "reference": reference, "project": project}
        for layout in args.layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for m in models.values():
                m.to(device=device, dtype=dtype, memory_format=fmt)
            for batch in args.batches:
                x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype).to(memory_format=fmt)
                for mode in args.modes:
                    row = {"model": name, "batch": batch, "layout": layout, "mode": mode, "device": args.device,
                           "dtype": args.dtype, "threads": torch.get_num_threads(), "size": args.size, "clock": args.clock}  # fmt: skip
                    try:
                        row.update(run_config(models, x, mode, args, device))
                    except Exception as exc:  # noqa: BLE001 - a benchmark reports and moves on
                        row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                    rows.append(row)
                    print_row(row)
    return rows


def run_config(models: dict[str, nn.Module], x: torch.Tensor, mode: str, args: argparse.Namespace,
               device: torch.device) -> dict:  # fmt: skip
    fns: dict[str, Callable[[], object]] = {}
    extra: dict = {}
    with torch.inference_mode():
        if mode == "compile":
            torch._dynamo.reset()
            t0 = time.perf_counter()
            with time_limit(args.compile_timeout):
                compiled = {k: torch.compile(m) for k, m in models.items()}
                for m in compiled.values():
                    m(x)
            extra["compile_s"] = round(time.perf_counter() - t0, 1)
            runners = compiled
        else:
            runners = models
        outs = {k: m(x) for k, m in runners.items()}
        # the reference and project CBAM have the same weights: the patched outputs must agree
        extra["reference_vs_project_maxdiff"] = max_abs_diff(outs["reference"], outs["project"])
        for k, m in runners.items():
            fns[k] = lambda m=m: m(x)
        if args.native and mode == "eager" and device.type == "cpu":
            # the project's model again, its CBAM calls on the optional compiled kernel
            native.enable()
            try:
                extra["native_vs_project_maxdiff"] = max_abs_diff(models["project"](x), outs["project"])
            finally:
                native.disable()
            fns["native"] = lambda m=models["project"]: _on_native(m, x)
        times, faults = measure(fns, args.reps, args.warmup, device, args.clock)
    return {**summarise(times, faults), **extra}


def _on_native(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    native.enable()  # built and loaded already: this only switches it on
    try:
        return model(x)
    finally:
        native.disable()


def print_row(row: dict) -> None:
    head = f"{row['model']:<13} b={row['batch']:<2} {row['layout']:<13} {row['mode']:<7}"
    if "skipped" in row:
        print(f"{head} skipped: {row['skipped']}", flush=True)
        return
    print(
        f"{head} bare {row['bare_ms']:8.2f} ms | reference {row['reference_ms']:8.2f} (+{row['reference_added_ms']:7.2f}) | "
        f"project {row['project_ms']:8.2f} (+{row['project_added_ms']:7.2f}) | ratio {row['ratio']:.2f}"
        + (f" | native {row['native_ms']:8.2f} (+{row['native_added_ms']:7.2f}) ratio {row['native_ratio']:.2f}"
           if "native_ms" in row else "")
        + (f" | compile {row['compile_s']} s" if "compile_s" in row else "")
        + (f" | page faults/fwd {row['bare_faults']:.0f} / {row['reference_faults']:.0f} / {row['project_faults']:.0f}"
           if row.get("device", "cpu") == "cpu" and "bare_faults" in row else ""),
        flush=True,
    )


def markdown(rows: list[dict]) -> str:
    lines = [
        (
            "| model | batch | layout | mode | bare ms | reference CBAM ms (added) | project CBAM ms (added) | ratio "
            "| native kernel ms (added) | ratio |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['layout']} | {r['mode']} | skipped: {r['skipped']} | | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['layout']} | {r['mode']} | {r['bare_ms']:.2f} | "
            f"{r['reference_ms']:.2f} (+{r['reference_added_ms']:.2f}) | {r['project_ms']:.2f} (+{r['project_added_ms']:.2f}) | "
            f"{r['ratio']:.2f} | "
            + (f"{r['native_ms']:.2f} (+{r['native_added_ms']:.2f}) | {r['native_ratio']:.2f} |"
               if "native_ms" in r else "| |")
        )
    return "\n".join(lines)


def profile(args: argparse.Namespace) -> None:
    """Per-op cost of the CBAM modules alone, run on the feature maps they see inside the model.

    One forward of the patched model records each CBAM's input; each module (project's, and the
    reference CBAM with the same weights) then runs on its own input under ``torch.profiler`` and the
    ops are summed over all sites.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in args.models:
        _, project, _ = build(name)
        project.to(device=device, dtype=dtype)
        for layout in args.layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            project.to(memory_format=fmt)
            for batch in args.batches:
                inputs: list[tuple[CBAM, torch.Tensor]] = []
                hooks = [m.register_forward_pre_hook(lambda m, a, seen=inputs: seen.append((m, a[0])))
                         for m in project.modules() if isinstance(m, CBAM)]  # fmt: skip
                x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype).to(memory_format=fmt)
                with torch.inference_mode():
                    project(x)
                for h in hooks:
                    h.remove()
                for label, mods in (
                    ("project", [m for m, _ in inputs]),
                    ("reference", [ReferenceCBAM.like(m) for m, _ in inputs]),
                ):
                    with torch.inference_mode():
                        for m, (_, t) in zip(mods, inputs):
                            m(t)
                        with tprofile(activities=activities) as prof:
                            for _ in range(args.reps):
                                for m, (_, t) in zip(mods, inputs):
                                    m(t)
                    print(f"\n== {name} b={batch} {layout}: {label} CBAM, {len(mods)} sites x {args.reps} reps ==")
                    print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument(
        "--layouts", nargs="+", default=["contiguous", "channels_last"], choices=["contiguous", "channels_last"]
    )
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--reps", type=int, default=15, help="timed rounds (each round runs every model once)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="CPU: wall time or process CPU time")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile-timeout", type=float, default=240.0, help="seconds allowed to compile the three models")
    p.add_argument("--quick", action="store_true", help="smoke test: 64x64, batch 1, 2 rounds, eager only")
    p.add_argument("--profile", action="store_true", help="profile the CBAM modules instead of timing models")
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument(
        "--native",
        action="store_true",
        help="also time the project's model on the optional compiled CPU kernel (cbam_insert.native; eager CPU "
        "rows; builds it on first use, some 20 s)",
    )
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--markdown", type=Path, help="write a Markdown table here")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.reps, args.warmup, args.modes = 64, [1], 2, 1, ["eager"]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {args.device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, {args.size}x{args.size}, {args.reps} rounds, {args.clock} clock, "
          "eval + inference_mode",
          flush=True)  # fmt: skip
    if args.native:
        try:
            native.build()
        except CBAMInsertError as exc:
            print(f"--native: {exc}", file=sys.stderr)
            return 1
    if args.profile:
        profile(args)
        return 0
    rows = bench(args)
    table = markdown(rows)
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
