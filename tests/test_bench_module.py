"""Smoke test of benchmarks/bench_module.py in its quick mode (a few seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_module.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_module", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_times_and_measures_every_implementation(capsys):
    bench = _load()
    results = bench.main(["--quick", "--reps", "1", "--shape", "2,32,8,8", "--markdown"])
    out = capsys.readouterr().out
    assert "| 2x32x8x8 | reference |" in out and "| 2x32x8x8 | cbam_insert |" in out
    rows = results[(2, 32, 8, 8)]
    assert {"reference", "cbam_insert"} <= set(rows)
    for row in rows.values():
        assert row["fwd"] > 0 and row["fb"] > 0 and row["peak"] > 0
    # the fused module keeps less for backward than the reference CBAM's F' (2*32*8*8 floats = 16 KiB)
    assert rows["cbam_insert"]["saved"] < rows["reference"]["saved"]


def test_reference_formulation_matches_the_module():
    bench = _load()
    import torch

    from cbam_insert import CBAM

    m = CBAM(48)
    x = torch.randn(2, 48, 9, 9)
    torch.testing.assert_close(bench.ReferenceCBAM.like(m)(x), m(x), atol=1e-6, rtol=1e-6)


def test_bfloat16_run_and_bad_device():
    bench = _load()
    results = bench.main(["--quick", "--reps", "1", "--shape", "2,32,8,8", "--dtype", "bfloat16", "--no-timm"])
    assert all(r["fwd"] > 0 and r["fb"] > 0 for r in results[(2, 32, 8, 8)].values())
    import pytest

    with pytest.raises(SystemExit) as err:
        bench.main(["--quick", "--device", "nope"])
    assert err.value.code == 2


def test_peak_memory_counts_new_storages_only():
    """Views, ``out=`` and in-place results of existing tensors are not new memory; a new tensor is."""
    bench = _load()
    import torch

    x = torch.randn(64, 64)
    buf = torch.empty(64, 64)
    with bench.LiveBytes() as live:
        x[:32].t()
        torch.mul(x, 2, out=buf)
        buf.add_(1)
    assert live.peak == 0
    with bench.LiveBytes() as live:
        y = x * 2
    assert live.peak == y.untyped_storage().nbytes() == 64 * 64 * 4


def test_native_row_times_the_compiled_kernel_forward(capsys, native_kernel):
    from cbam_insert import native

    bench = _load()
    results = bench.main(["--quick", "--reps", "1", "--shape", "2,32,8,8", "--no-timm", "--native", "--markdown"])
    out = capsys.readouterr().out
    assert "| 2x32x8x8 | cbam_insert native |" in out
    row = results[(2, 32, 8, 8)]["cbam_insert native"]
    assert set(row) == {"fwd"} and row["fwd"] > 0
    assert not native.is_enabled()  # switched on only around its own calls
