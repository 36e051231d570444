"""The benchmarks run (smoke tests, no timing assertions) and the package imports lazily."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_HEAVY = ("onnx", "onnxruntime", "timm", "safetensors")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("module", ["cbam_insert", "cbam_insert.cli"])
def test_import_does_not_load_optional_heavy_packages(module):
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in {OPTIONAL_HEAVY!r} if m in sys.modules)))"
    loaded = json.loads(_run("-c", code).stdout.strip().splitlines()[-1])
    assert loaded == [], f"import {module} loaded {loaded}"


def test_bench_model_quick_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run("benchmarks/bench_model.py", "--quick", "--models", "resnet18", "--threads", "1", "--json", str(out))
    assert "ratio" in proc.stdout
    rows = json.loads(out.read_text())
    assert {(r["layout"], r["mode"]) for r in rows} == {("contiguous", "eager"), ("channels_last", "eager")}
    for r in rows:
        assert "skipped" not in r, r
        assert r["bare_ms"] > 0 and r["reference_ms"] > 0 and r["project_ms"] > 0
        # same weights in the reference and the project's CBAM: the patched models agree
        assert r["reference_vs_project_maxdiff"] < 1e-3
        assert min(r["bare_faults"], r["reference_faults"], r["project_faults"]) >= 0


def test_bench_model_native_times_the_compiled_kernel_too(tmp_path, native_kernel):
    out = tmp_path / "rows.json"
    proc = _run("benchmarks/bench_model.py", "--quick", "--models", "resnet18", "--threads", "1", "--native",
                "--layouts", "contiguous", "--json", str(out))  # fmt: skip
    assert "native" in proc.stdout
    (row,) = json.loads(out.read_text())
    assert row["native_ms"] > 0
    # two quick rounds: an added latency can come out <= 0, and the ratio is then undefined
    if row["reference_added_ms"] > 0:
        assert row["native_ratio"] == row["native_added_ms"] / row["reference_added_ms"]
    else:
        assert math.isnan(row["native_ratio"])
    assert row["native_vs_project_maxdiff"] < 1e-4


def test_import_does_not_build_or_load_the_native_kernel():
    code = "import sys, cbam_insert, cbam_insert.cli; print(sorted(m for m in ('torch.utils.cpp_extension', 'cbam_insert.native') if m in sys.modules))"
    assert _run("-c", code).stdout.strip().splitlines()[-1] == "[]"


def test_bench_model_profile_quick_prints_op_tables():
    proc = _run("benchmarks/bench_model.py", "--quick", "--models", "resnet18", "--layouts", "contiguous",
                "--threads", "1", "--profile")  # fmt: skip
    assert "project CBAM" in proc.stdout and "reference CBAM" in proc.stdout


def test_bench_cli_quick_runs_and_prints_the_ratio():
    proc = _run("benchmarks/bench_cli.py", "--quick")
    assert "ratio cbam-insert / import" in proc.stdout


def test_bench_attention_quick_checks_each_module_against_its_reference_and_prints_ratios():
    pytest.importorskip("timm")
    out = _run("benchmarks/bench_attention.py", "--quick").stdout
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in
            ("se", "eca", "coord", "simam", "bam", "gam", "triplet")]  # fmt: skip
    assert [r[0] for r in rows] == ["se", "eca", "coord", "simam", "bam", "gam", "triplet"]
    for r in rows:
        ratios = [float(r[-6]), float(r[-2])]  # fwd and train: ratio, then the per-round quartiles
        assert all(math.isfinite(v) and v > 0 for v in ratios), r
        for q in (r[-5], r[-1]):
            q1, q3 = map(float, q.split("-"))
            assert 0 < q1 <= q3, r


def test_bench_attention_resnet50_table_counts_module_options():
    out = _run("benchmarks/bench_attention.py", "--resnet50", "--quick", "--modules", "eca,se/reduction=8").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["eca"], ["se/reduction=8"])}
    channels = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # the 16 bottlenecks' outputs
    se = sum(2 * c * (c // 8) + c // 8 + c for c in channels)  # two FC layers with biases, r = 8
    assert int(rows["se/reduction=8"][1].replace(",", "")) == se
    assert int(rows["eca"][1].replace(",", "")) == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7  # k(256..1024) = 5, k(2048) = 7
    assert all(float(r[-1].removesuffix("ms")) > 0 for r in rows.values())
