"""Time each attention module of ``cbam_insert.attention`` against the straightforward formulation.

Run from the repository root::

    python benchmarks/bench_attention.py             # the full run
    python benchmarks/bench_attention.py --quick     # seconds: small maps, 3 rounds
    python benchmarks/bench_attention.py --shape 8,256,28,28 --rounds 15
    python benchmarks/bench_attention.py --resnet50   # each module in every ResNet-50 bottleneck
    python benchmarks/bench_attention.py --resnet50 --modules gam,gam/groups=4   # options as /key=value

The straightforward formulation is timm's module where timm has one (SE: ``SEModule``, ECA:
``EcaModule``, coordinate attention: ``CoordAttn``, each built with the paper's widths and
biases), and otherwise a plain transcription written here of the paper's figure as its authors'
code spells it (SimAM, BAM, GAM with its permute + Linear channel MLP, triplet attention with
``permute(...).contiguous()``). Every reference gets the cbam_insert module's weights and the two
outputs are checked to agree before anything is timed. CBAM against timm's ``CbamModule`` is
``benchmarks/bench_module.py``.

Measured per module, on one (N, C, H, W) map:

* ``fwd``: one inference forward (``eval()``, ``torch.no_grad()``);
* ``train``: one training step of the module alone (``train()``, input requiring grad,
  forward and ``out.backward(g)``), parameter gradients included.

Rounds are interleaved (every implementation once per round, in a shuffled order) and the
figure is the median. A sample repeats the call until it lasts about ``--min-sample-ms`` (20 ms;
the warm-up round sets the count, the same for a module and its reference), so one sample of a
1 ms module is not one scheduler tick's worth of noise. With one intra-op thread (the default)
the clock is the thread's CPU time, which other processes on a shared machine do not inflate;
otherwise wall time. The ratio is cbam_insert's time over the reference's (below 1: faster);
the quartiles are those of the per-round ratios (each round times both), so an interval that
straddles 1 says the run cannot tell the two apart.

``--resnet50`` instead puts each module into every bottleneck of torchvision's ResNet-50
(``after="block"``, the placement of the CBAM, BAM-in-block and SE papers) and prints, per module,
the parameters and MACs added (``cbam_insert.report.cost_report``) and the eval-mode latency
added on one 1x3x224x224 image, two ways: the whole patched model's time minus the original's
(the fastest of the interleaved rounds of each: the least disturbed by other work on the machine),
and the sum of the sites' own latencies (``report.site_latency``: each inserted module alone on the
tensor it receives, median).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_insert.attention import ATTENTION

MODULES = ["se", "eca", "coord", "simam", "bam", "gam", "triplet"]


class PlainSimAM(nn.Module):
    def __init__(self, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2] * x.shape[3] - 1
        d = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
        y = d / (4 * (d.sum(dim=[2, 3], keepdim=True) / n + self.e_lambda)) + 0.5
        return x * torch.sigmoid(y)


class PlainBAM(nn.Module):
    def __init__(self, c: int, r: int = 16, d: int = 4) -> None:
        super().__init__()
        h = c // r
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, h), nn.ReLU(), nn.Linear(h, c), nn.BatchNorm1d(c))
        self.spatial = nn.Sequential(
            nn.Conv2d(c, h, 1), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=d, dilation=d), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=d, dilation=d), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, 1, 1), nn.BatchNorm2d(1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mc = self.mlp(F.adaptive_avg_pool2d(x, 1)).unsqueeze(2).unsqueeze(3).expand_as(x)
        ms = self.spatial(x).expand_as(x)
        return x + x * torch.sigmoid(mc + ms)


class PlainGAM(nn.Module):
    def __init__(self, c: int, rate: int = 4) -> None:
        super().__init__()
        h = c // rate
        self.channel = nn.Sequential(nn.Linear(c, h), nn.ReLU(inplace=True), nn.Linear(h, c))
        self.spatial = nn.Sequential(
            nn.Conv2d(c, h, 7, padding=3), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
            nn.Conv2d(h, c, 7, padding=3), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        att = self.channel(x.permute(0, 2, 3, 1).reshape(b, -1, c)).view(b, h, w, c).permute(0, 3, 1, 2)
        x = x * torch.sigmoid(att)
        return x * torch.sigmoid(self.spatial(x))


class _PlainGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.bn(self.conv(z)))


class PlainTriplet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cw, self.hc, self.hw = _PlainGate(), _PlainGate(), _PlainGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cw(x.permute(0, 2, 1, 3).contiguous()).permute(0, 2, 1, 3).contiguous()
        y2 = self.hc(x.permute(0, 3, 2, 1).contiguous()).permute(0, 3, 2, 1).contiguous()
        y3 = self.hw(x)
        return 1 / 3 * (y3 + y1 + y2)


def _copy(dst: nn.Module, src: nn.Module) -> None:
    """``src``'s parameters and buffers into ``dst``, in order, reshaped where a 1x1 conv stands for a linear."""
    with torch.no_grad():
        for a, b in zip(dst.parameters(), src.parameters(), strict=True):
            a.copy_(b.reshape(a.shape))
        for a, b in zip(dst.buffers(), src.buffers(), strict=True):
            a.copy_(b.reshape(a.shape))


def reference(name: str, ours: nn.Module) -> tuple[str, nn.Module]:
    c = ours.channels
    if name == "se":
        from timm.layers import SEModule

        ref: nn.Module = SEModule(c, rd_channels=ours.fc1.out_features, bias=True)
        _copy(ref, ours)
        return "timm SEModule", ref
    if name == "eca":
        from timm.layers import EcaModule

        ref = EcaModule(kernel_size=ours.kernel_size)
        _copy(ref, ours)
        return "timm EcaModule", ref
    if name == "coord":
        from timm.layers.coord_attn import CoordAttn

        ref = CoordAttn(c, rd_channels=ours.conv1.out_channels, bias=True)
        _copy(ref, ours)
        return "timm CoordAttn", ref
    if name == "simam":
        return "plain (authors' code)", PlainSimAM()
    if name == "bam":
        ref = PlainBAM(c)
        with torch.no_grad():  # order: fc0, fc1, channel bn; then the spatial sequence
            _copy(ref, ours)
        return "plain (paper's eqs.)", ref
    if name == "gam":
        ref = PlainGAM(c)
        _copy(ref, ours)
        return "plain (permute + Linear)", ref
    ref = PlainTriplet()
    _copy(ref, ours)
    return "plain (authors' code)", ref


def _clock() -> Callable[[], float]:
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _fwd(m: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            m(x)

    return run


def _train(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    xi = x.clone().requires_grad_()

    def run() -> None:
        m.zero_grad(set_to_none=True)
        xi.grad = None
        m(xi).backward(g)

    return run


def resnet50_table(rounds: int, names: list[str]) -> None:
    import torchvision

    from cbam_insert import insert_attention
    from cbam_insert.report import cost_report, site_latency

    torch.manual_seed(0)
    x = torch.rand(1, 3, 224, 224)
    original = torchvision.models.resnet50().eval()
    models: dict[str, nn.Module] = {"original": original}
    rows = {}
    for name in names:
        module, options = parse_module(name)
        patched = insert_attention(original, after="block", example_inputs=(x,), module=module, seed=0, **options).eval()
        cost = cost_report(original, patched, (x,), modules=patched.cbam_report.modules)
        rows[name] = (cost, patched.cbam_report.modules)
        models[name] = patched
    clock = _clock()
    times: dict[str, list[float]] = {k: [] for k in models}
    rng = random.Random(0)
    with torch.inference_mode():
        for r in range(rounds + 1):
            order = list(models)
            rng.shuffle(order)
            for k in order:
                t0 = clock()
                models[k](x)
                if r:
                    times[k].append(clock() - t0)
    base = min(times["original"])
    print(f"ResNet-50, every bottleneck (after=block, 16 sites), 1x3x224x224, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}; model latency: fastest of {rounds} interleaved rounds")  # fmt: skip
    print(f"original: {original_params(original):,} params, {cost.flops_before / 1e9:.3f} GMACs, {base * 1e3:.1f} ms")
    print(f"{'module':14} {'params +':>12} {'MACs +':>16} {'model +':>10} {'sum of sites':>13}")
    for name, (cost, modules) in rows.items():
        added = (min(times[name]) - base) * 1e3
        per_site = sum(site_latency(models[name], (x,), modules, runs=max(3, rounds // 2), clock=clock).values()) * 1e3
        print(f"{name:14} {cost.params_delta:>12,} {cost.flops_delta:>16,} {added:>8.1f}ms {per_site:>11.1f}ms")


def parse_module(text: str) -> tuple[str, dict[str, int | float]]:
    """``gam/groups=4`` -> ("gam", {"groups": 4}): a module with options for the ResNet-50 table."""
    name, *pairs = text.split("/")
    options: dict[str, int | float] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = float(value) if "." in value or "e" in value else int(value)
    return name, options


def original_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8,128,28,28", help="N,C,H,W of the map (default 8,128,28,28)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--min-sample-ms", type=float, default=20.0,
                   help="each sample repeats the call until it lasts about this long (default 20)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a small map and 3 rounds (a smoke test)")
    p.add_argument("--modules", default=None, help="comma-separated (default: all)")
    p.add_argument("--resnet50", action="store_true", help="the cost of each module in every ResNet-50 bottleneck")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.resnet50:
        names = args.modules.split(",") if args.modules else ["cbam", *MODULES]
        resnet50_table(3 if args.quick else args.rounds, names)
        return 0
    if args.modules is None:
        args.modules = ",".join(MODULES)
    shape = (2, 32, 12, 12) if args.quick else tuple(int(s) for s in args.shape.split(","))
    rounds = 3 if args.quick else args.rounds
    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    g = torch.randn(*shape)
    clock = _clock()
    min_sample = 0.0 if args.quick else args.min_sample_ms / 1e3

    pairs = {}
    for name in names:
        ours = ATTENTION[name](shape[1])
        label, ref = reference(name, ours)
        for m in (ours, ref):
            m.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
        pairs[name] = (label, ours, ref)

    jobs: list[tuple[str, str, str, Callable[[], None]]] = []
    for name, (_, ours, ref) in pairs.items():
        for which, m in (("ours", ours), ("ref", ref)):
            jobs.append((name, "fwd", which, _fwd(m, x)))
            jobs.append((name, "train", which, _train(m, x, g)))
    times: dict[tuple[str, str, str], list[float]] = {j[:3]: [] for j in jobs}
    modes = {id(m): m for _, ours, ref in pairs.values() for m in (ours, ref)}
    rng = random.Random(0)
    reps: dict[tuple[str, str], int] = {}  # calls per sample, the same for ours and the reference
    for r in range(rounds + 1):  # round 0 warms up and sets the calls per sample
        order = list(jobs)
        rng.shuffle(order)
        for name, what, which, run in order:
            m = pairs[name][1] if which == "ours" else pairs[name][2]
            m.train(what == "train")
            n = reps.get((name, what), 1) if r else 1
            t0 = clock()
            for _ in range(n):
                run()
            dt = (clock() - t0) / n
            if r:
                times[(name, what, which)].append(dt)
            else:
                reps[(name, what)] = max(reps.get((name, what), 1), math.ceil(min_sample / max(dt, 1e-6)))
    del modes

    print(f"attention modules on a {'x'.join(map(str, shape))} float32 map, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}, median of {rounds} interleaved rounds, samples of >= {min_sample * 1e3:g} ms (ms per call)")  # fmt: skip
    print("ratio: median ours / median reference; quartiles: of the per-round ratios (same round, paired)")
    print(
        f"{'module':8} {'reference':26} {'fwd ours':>9} {'fwd ref':>9} {'ratio':>6} {'quartiles':>11}"
        f" {'train ours':>10} {'train ref':>10} {'ratio':>6} {'quartiles':>11}"
    )
    for name, (label, _, _) in pairs.items():
        row = [name.ljust(8), label.ljust(26)]
        for what in ("fwd", "train"):
            ours_t, ref_t = times[(name, what, "ours")], times[(name, what, "ref")]
            a, b = statistics.median(ours_t) * 1e3, statistics.median(ref_t) * 1e3
            q1, _, q3 = paired_quartiles(ours_t, ref_t)
            w = 9 if what == "fwd" else 10
            row += [f"{a:{w}.3f}", f"{b:{w}.3f}", f"{a / b:6.2f}", f"{q1:.2f}-{q3:.2f}".rjust(11)]
        print(" ".join(row))
    return 0


def paired_quartiles(ours: list[float], ref: list[float]) -> tuple[float, float, float]:
    """Quartiles of the per-round ratios ``ours[i] / ref[i]`` (both timed in round i): how far the
    machine's noise moves the ratio. An interval that straddles 1 means the run cannot tell the two apart."""
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return q1, q2, q3


if __name__ == "__main__":
    raise SystemExit(main())
