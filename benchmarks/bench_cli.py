"""End-to-end speed of the ``cbam-insert`` command against importing torch and torchvision.

Two commands, run interleaved in fresh processes, several times each; medians are printed and
their ratio (the target is ≤ 2). CPU time (user + system, from ``getrusage``) is printed beside
wall time: on a busy machine it is the steadier of the two.

* ``python -c "import torch, torchvision"`` — the floor any torchvision-based tool pays;
* ``cbam-insert torchvision:resnet50 --after block -o OUT.pt`` — load, trace, find sites, splice,
  count parameters and FLOPs, save.

``--breakdown`` also runs the command once under cProfile and prints the time spent in each
function that the CLI calls directly (loading, patching, the cost report, saving), in CPU time, plus the
import time of ``cbam_insert.cli``.

    python benchmarks/bench_cli.py                 # 5 runs each
    python benchmarks/bench_cli.py --quick         # smoke test: one run each, resnet18
"""

from __future__ import annotations

import argparse
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_args(model: str, out: Path) -> list[str]:
    return [f"torchvision:{model}", "--after", "block", "-o", str(out), "--force", "--quiet"]


def cli_command(model: str, out: Path) -> list[str]:
    """The installed ``cbam-insert`` script next to this interpreter, else ``python -m cbam_insert.cli``."""
    args = cli_args(model, out)
    script = Path(sys.executable).with_name("cbam-insert")
    if script.exists():
        return [str(script), *args]
    found = shutil.which("cbam-insert")
    return [found, *args] if found else [sys.executable, "-m", "cbam_insert.cli", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``cmd`` in a fresh process."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env(), capture_output=True, text=True)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return dt, cpu


def breakdown(model: str, out: Path, cwd: Path) -> None:
    """Where the command's time goes: cProfile of one run, grouped by the CLI's direct callees."""
    prof = cwd / "cli.prof"
    code = (
        "import cProfile, sys, time\n"
        f"sys.argv = {['cbam-insert', *cli_args(model, out)]!r}\n"
        "from cbam_insert.cli import main\n"
        "pr = cProfile.Profile(time.process_time)\n"
        "pr.enable()\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "pr.disable()\n"
        f"pr.dump_stats({str(prof)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env(), check=True, capture_output=True)
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    cli_file = os.path.join("cbam_insert", "cli.py")
    in_cli = [f for f in stats if f[0].endswith(cli_file) and f[2] not in ("main", "<module>")]
    if not in_cli:
        print("breakdown: no function of cbam_insert/cli.py in the profile")
        return
    total = max(stats[f][3] for f in in_cli)
    parts = []  # functions outside cli.py, with the time spent in them when cli.py called them
    for func, (_, _, _, _, callers) in stats.items():
        if not func[0].endswith(cli_file):
            ct = sum(c[3] for caller, c in callers.items() if caller in in_cli)
            if ct > 0:
                parts.append((ct, func))
    print(f"\nbreakdown (CPU seconds, one run under cProfile, which slows Python code; the command: {total:.2f} s):")
    for ct, (file, line, name) in sorted(parts, reverse=True)[:12]:
        where = Path(file).name if file != "~" else "builtin"
        print(f"  {ct:7.2f} s  {name}  ({where}:{line})")
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import cbam_insert.cli"], check=False, cwd=cwd, env=env(),
                         capture_output=True, text=True)  # fmt: skip
    rows = [ln.split("|") for ln in imp.stderr.splitlines() if ln.startswith("import time:") and "|" in ln]
    cum = {r[2].strip(): int(r[1]) / 1e6 for r in rows if r[1].strip().isdigit()}
    for mod in ("torch", "torchvision", "typer", "rich", "cbam_insert", "cbam_insert.cli"):
        if mod in cum:
            print(f"  import {mod}: {cum[mod]:.2f} s (cumulative, -X importtime)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each command")
    p.add_argument("--model", default="resnet50", help="torchvision model name")
    p.add_argument("--breakdown", action="store_true", help="also profile one run of the command")
    p.add_argument("--quick", action="store_true", help="smoke test: one run each, resnet18")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.model = 1, "resnet18"
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        out = cwd / f"{args.model}_cbam.pt"
        commands = {
            "import torch, torchvision": [sys.executable, "-c", "import torch, torchvision"],
            f"cbam-insert torchvision:{args.model} --after block": cli_command(args.model, out),
        }
        wall: dict[str, list[float]] = {k: [] for k in commands}
        cpu: dict[str, list[float]] = {k: [] for k in commands}
        for r in range(args.runs):
            order = list(commands) if r % 2 == 0 else list(commands)[::-1]
            for k in order:
                w, c = run_once(commands[k], cwd)
                wall[k].append(w)
                cpu[k].append(c)
        if not out.exists():
            raise RuntimeError(f"the command did not write {out}")
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        for k, v in wall.items():
            print(f"{k:<48} wall median {med[k]:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in v)}), "
                  f"CPU median {med_cpu[k]:6.2f} s")  # fmt: skip
        base, cli = med.values()
        base_cpu, cli_cpu = med_cpu.values()
        print(f"ratio cbam-insert / import: {cli / base:.2f} wall (target <= 2), {cli_cpu / base_cpu:.2f} CPU time")
        if args.breakdown:
            breakdown(args.model, out, cwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
