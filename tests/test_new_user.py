"""What a new user hit on a first run: the report, the errors, --json, the install scripts.

Each test reproduces one defect as it was found, through the command (``python -m cbam_insert``
in a subprocess, stdout piped as in a script) where the defect is about the command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from cbam_insert.report import SPREAD_WARNING, BenchResult, count_macs, render_bench, render_report, report_dict

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--input-shape", "1,3,64,64"]
DETECTOR = "torchvision:fasterrcnn_mobilenet_v3_large_fpn"  # its transform resizes a 320 px image to 800


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    return subprocess.run(
        [sys.executable, "-m", "cbam_insert", *map(str, args)], check=False, cwd=cwd or ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def cbam_macs(channels: int, spatial: list[int], reduction: int = 16, kernel: int = 7) -> int:
    """The default CBAM's MACs at batch 1: the shared MLP on two descriptors plus the 2-in, 1-out spatial conv."""
    hidden = max(1, channels // reduction)
    positions = 1
    for s in spatial:
        positions *= s
    return 2 * 2 * channels * hidden + 2 * kernel**len(spatial) * positions


# ----------------------------------------------------------------------------- 1. detector costs


@pytest.fixture(scope="module")
def detector_runs() -> tuple[dict, str]:
    """A detector's --json dry run and its plain report."""
    runs = [cli(DETECTOR, "--dry-run", "--json"), cli(DETECTOR, "--dry-run")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    return json.loads(runs[0].stdout), runs[1].stdout


def test_detector_site_costs_are_counted_at_the_shapes_the_report_shows(detector_runs):
    data, text = detector_runs
    assert "held while counting: image kept at 320x320 (the model's transform would resize it to 800x800)" in text
    used = [s for s in data["sites"] if s["used"]]
    assert used and data["input"]["tuple"][0]["list"][0]["shape"] == [3, 320, 320]
    for s in used:  # was: shapes at 320 px, MACs at the 800 px the transform resized to
        assert s["flops"] == cbam_macs(s["channels"], s["spatial"]), s["name"]
    assert used[0]["spatial"] == [160, 160]
    assert data["flops"]["delta"] == sum(s["flops"] for s in used)
    held = data["flops"]["held"]
    assert "image kept at 320x320 (the model's transform would resize it to 800x800)" in held
    assert any(h.startswith("proposals at capacity: 1000 per image") for h in held)
    assert any(h.startswith("detections at capacity: 100 per image") for h in held)


def test_detector_heads_are_counted_at_capacity_as_torchvision_counts_them():
    """Random weights change how many proposals survive NMS; counted at capacity, two different
    weight draws give one count, and at 800 px it is torchvision's own figure (134.38 GMACs)."""
    counts = []
    for seed in (0, 1):  # these two draws counted 134.02 G and 134.38 G before
        torch.manual_seed(seed)
        model = torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None)
        counts.append(count_macs(model, ([torch.rand(3, 800, 800)],))[0])
    assert counts[0] == counts[1]
    meta = torchvision.models.get_model_weights("fasterrcnn_resnet50_fpn").DEFAULT.meta
    assert round(counts[0] / 1e9, 2) == meta["_ops"]
    assert model.rpn.nms_thresh == 0.7 and model.roi_heads.score_thresh == 0.05  # restored after counting


# ----------------------------------------------------------------------------- 2. a selection that keeps nothing


def test_stage_filter_that_keeps_nothing_says_what_the_model_has(tmp_path: Path):
    dry = cli("torchvision:resnet18", *SMALL, "--stages", "5", "--dry-run", cwd=tmp_path)
    real = cli("torchvision:resnet18", *SMALL, "--stages", "5", cwd=tmp_path)
    message = (
        "no site for after='block' in ResNet kept by the selection: the model has 8 such sites in stages 1-4, "
        "and stages 5 keeps none of them"
    )
    assert dry.returncode == 0 and f"dry run, nothing written: {message}" in dry.stdout  # dry runs never fail
    assert real.returncode == 1 and real.stderr == f"error: {message}\n"
    assert "stage 4 outside stages 5-5" in dry.stdout  # every skipped site still listed
    assert list(tmp_path.iterdir()) == []


def test_min_channels_that_keeps_nothing_says_the_channel_range():
    from cbam_insert import insert_cbam
    from cbam_insert.errors import CBAMInsertError

    with pytest.raises(CBAMInsertError) as info:
        insert_cbam(torchvision.models.resnet18(), example_inputs=(torch.rand(1, 3, 64, 64),), min_channels=1024)
    assert str(info.value) == (
        "no site for after='block' in ResNet kept by the selection: the model has 8 such sites with 64-512 channels, "
        "and min_channels 1024 keeps none of them"
    )


# ----------------------------------------------------------------------------- 3. untraced parts


def test_untraced_parts_one_line_each_with_a_short_reason(detector_runs):
    _, text = detector_runs
    lines = text.splitlines()
    start = lines.index("not traced (left as they are):")
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line)
    assert "  <model>: whole model: TraceError: Proxy object cannot be iterated" in block
    assert "  transform: GeneralizedRCNNTransform: no parameters, left as it is" in block
    assert len(block) > 5 and all(len(line) < 200 for line in block), block
    assert "See the torch.fx docs" not in text and "docs on py" not in text


def test_short_reason_is_the_first_sentence_cut_at_a_word():
    from cbam_insert.trace import _short_reason

    long = RuntimeError("Proxy object cannot be iterated. This can be attempted when the Proxy is used in a loop.")
    assert _short_reason(long) == "RuntimeError: Proxy object cannot be iterated"
    words = RuntimeError(" ".join(["word"] * 60))
    short = _short_reason(words)
    assert short.endswith("word ...") and len(short) < 120


# ----------------------------------------------------------------------------- 4. --input-shape


def test_input_shape_of_the_wrong_rank_is_said_in_the_models_terms(tmp_path: Path):
    res = cli("torchvision:resnet18", "--input-shape", "1,3,224", cwd=tmp_path)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == (
        "error: --input-shape 1,3,224: the model's first layer conv1 (Conv2d) expects (N, 3, H, W); "
        "the shape given has rank 3\n"
    )
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 5. misspelt names


def test_misspelt_names_suggest_the_closest():
    from cbam_insert import load_model
    from cbam_insert.errors import CBAMInsertError

    with pytest.raises(CBAMInsertError, match=r"^unknown torchvision model 'resnt50'; did you mean resnet50, "):
        load_model("torchvision:resnt50")
    with pytest.raises(CBAMInsertError, match=r"^unknown torchvision model 'qwertyuiop'; see torchvision\.models"):
        load_model("torchvision:qwertyuiop")
    pytest.importorskip("timm")
    with pytest.raises(CBAMInsertError, match=r"^unknown timm model 'resnt50'; did you mean resnet50, "):
        load_model("timm:resnt50")


# ----------------------------------------------------------------------------- 6. token tensors


def test_token_tensor_sites_show_no_spatial_size():
    res = cli("torchvision:vit_b_16", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "0 used, 24 skipped" in res.stdout
    rows = [line for line in res.stdout.splitlines() if "encoder_layer_0.add " in line]
    cells = [c.strip() for c in rows[0].split("│")]
    assert cells[2:5] == ["block", "-", "-"], cells  # kind, channels, spatial (was: spatial 768)


# ----------------------------------------------------------------------------- 7. --json on failure


def test_json_failure_of_a_real_run_is_one_object_on_stdout(tmp_path: Path):
    res = cli("torchvision:resnet18", *SMALL, "--stages", "9", "--json", cwd=tmp_path)
    assert res.returncode == 1
    data = json.loads(res.stdout)  # was: nothing on stdout
    assert data["exit_code"] == 1 and "stage" in data["error"]
    assert res.stderr == f"error: {data['error']}\n"
    assert list(tmp_path.iterdir()) == []


def test_json_usage_error_is_one_object_on_stdout():
    res = cli("torchvision:resnet18", "--json", "--no-such-flag")
    assert res.returncode == 2
    data = json.loads(res.stdout)
    assert data["exit_code"] == 2 and data["error"].startswith("No such option: --no-such-flag")
    assert "No such option" in res.stderr


# ----------------------------------------------------------------------------- 8. piped output


def test_piped_report_has_no_trailing_spaces():
    res = cli("torchvision:resnet18", *SMALL, "--dry-run", "--bench")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) > 20 and lines[0].startswith("CBAM sites for --after block")
    assert [line for line in lines if line != line.rstrip()] == []


# ----------------------------------------------------------------------------- 11. install scripts


_STUB_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../../calls.log"
case " $* " in *" -c "*) exec {base} "$@" ;; esac   # checks run on a Python where nothing is installed
exit 0
"""


def _setup_calls(tmp_path: Path, script: str) -> list[str]:
    """The commands ``script`` runs in a fresh clone against a fresh .venv (a stub that records
    them and runs the install checks on the base interpreter, where cbam_insert is not installed)."""
    repo = tmp_path / "clone"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copytree(ROOT / "cbam_insert", repo / "cbam_insert")  # a clone has the source tree
    stub = repo / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    base = Path(sys.base_prefix) / "bin" / "python3"
    stub.write_text(_STUB_PYTHON.format(base=base if base.exists() else sys.executable))
    stub.chmod(0o755)
    cbam = repo / ".venv" / "bin" / "cbam-insert"
    cbam.write_text("#!/bin/sh\nexit 0\n")
    cbam.chmod(0o755)
    subprocess.run(["bash", str(repo / "scripts" / script)], cwd=tmp_path, check=False, capture_output=True, timeout=60)
    return (repo / "calls.log").read_text().splitlines()


def test_demo_installs_only_what_the_command_needs(tmp_path: Path):
    calls = _setup_calls(tmp_path, "demo.sh")
    installs = [c for c in calls if c.startswith("-m pip install") and "--upgrade pip" not in c]
    assert installs == ["-m pip install --quiet -e ."]  # was: -e .[test] (pytest, onnxruntime, ...)


def test_test_script_installs_the_test_extras(tmp_path: Path):
    calls = _setup_calls(tmp_path, "test.sh")
    assert "-m pip install --quiet -e .[test]" in calls
    assert any(c.startswith("-m pytest") for c in calls)


# ----------------------------------------------------------------------------- 12. --bench spread


def _text(renderable) -> str:
    import io

    from rich.console import Console

    console = Console(width=120, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_bench_shows_min_median_max_and_warns_when_the_rounds_disagree():
    steady = BenchResult([0.010, 0.0101, 0.0102], [0.011, 0.0111, 0.0112], "cpu")
    assert steady.warning is None and steady.spread == pytest.approx(0.0102 / 0.010)
    noisy = BenchResult([0.010, 0.0112, 0.018], [0.011, 0.020, 0.012], "cpu")  # 1.118x and 1.787x in one run
    assert noisy.spread == pytest.approx(0.020 / 0.011) and noisy.spread > SPREAD_WARNING
    text = " ".join(_text(render_bench(noisy)).replace("┃", " ").replace("│", " ").split())
    assert "min median max" in text
    assert "original 10.000 ms 11.200 ms 18.000 ms" in text and "patched 11.000 ms 12.000 ms 20.000 ms" in text
    assert "warning: the rounds vary by up to 1.82x" in text
    assert "warning" not in _text(render_bench(steady))
    d = noisy.to_dict()
    assert d["original"] == {"min": 10.0, "median": 11.2, "max": 18.0} and d["warning"] == noisy.warning


def test_bench_json_carries_every_rounds_spread():
    res = cli("torchvision:resnet18", *SMALL, "--dry-run", "--bench", "--json")
    assert res.returncode == 0, res.stderr
    bench = json.loads(res.stdout)["bench"]
    for key in ("original", "patched"):
        assert bench[key]["min"] <= bench[key]["median"] <= bench[key]["max"]
    assert bench["spread"] >= 1.0 and (bench["warning"] is None) == (bench["spread"] <= SPREAD_WARNING)


# ----------------------------------------------------------------------------- report helpers


def test_render_and_json_of_a_token_site_without_a_cost():
    from cbam_insert.api import PatchReport
    from cbam_insert.sites import Site

    site = Site("blocks.0.add", "block", 0, (1, 197, 768), False, "channel axis is 2, not 1")
    report = PatchReport("block", [site], [], [], [])
    assert report_dict(report, None)["sites"][0]["spatial"] is None
    row = [line for line in _text(render_report(report, None, show_skipped=True)[0]).splitlines() if "blocks.0" in line]
    assert re.search(r"│ block\s+│\s+-\s+│\s+-\s+│", row[0]), row


# ----------------------------------------------------------------------------- 9. warnings


def test_the_cbam_code_raises_no_warning_under_jit_trace_and_export():
    import warnings

    from cbam_insert import CBAM, insert_cbam

    x = torch.rand(1, 3, 64, 64)
    patched = insert_cbam(torchvision.models.resnet18(), example_inputs=(x,), max_sites=2).eval()
    module = CBAM(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            torch.jit.trace(patched, (x,))
        torch.jit.trace(module.train(), torch.rand(2, 16, 8, 8, requires_grad=True))
        torch.jit.trace(module.eval(), torch.rand(2, 16, 8, 8))
        torch.export.export(patched, (x,))
    ours = [f"{w.filename}:{w.lineno}: {w.message}"[:200] for w in caught if "cbam_insert" in w.filename]
    assert ours == []  # was: TracerWarnings from the input check and the eager helpers
    assert any(issubclass(w.category, FutureWarning) for w in caught)  # torch.jit.trace's own deprecation


# ----------------------------------------------------------------------------- 10. docs


def test_docs_state_the_onnx_opset_the_code_uses():
    from cbam_insert.formats import ONNX_OPSET as opset

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    stated = {(p.name, int(n)) for p in docs for n in re.findall(r"opset[ _]?(?:version[ =]*)?(\d+)", p.read_text())}
    assert ("cli.md", opset) in stated
    assert {n for _, n in stated} == {opset}, stated  # was: opset 17 in one place, 18 in another


def test_cli_doc_lists_every_option_and_the_default_output_names():
    from typer.main import get_command

    from cbam_insert.cli import app
    from cbam_insert.formats import FORMATS, default_output

    doc = (ROOT / "docs" / "cli.md").read_text()
    for param in get_command(app).params:
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", doc), opt
    for fmt in FORMATS:
        assert f"`./{default_output('torchvision:resnet18', fmt).name}`" in doc, fmt
    assert "resnet18_cbam.onnx" in doc
    duration = r"about ([\d-]+) minutes on 2 idle\s+cores"  # the test suite's (was: not stated)
    assert re.findall(duration, doc) == re.findall(duration, (ROOT / "README.md").read_text()) != []
    assert f"{SPREAD_WARNING}x" in doc
