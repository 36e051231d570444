"""The ``cbam-insert`` command, in process (Typer's CliRunner) and as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from cbam_insert import CBAM, __version__, load_model
from cbam_insert.cli import app

SMALL = ["--input-shape", "1,3,64,64"]


def run(*args: str, cwd: Path | None = None):
    """Invoke the CLI in process; ``cwd`` is where relative paths resolve."""
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "model.pt"
    torch.save(torchvision.models.resnet18(), path)
    return path


@pytest.fixture
def model_pt(model_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(model_file.read_bytes())
    return path


def _cbams(model: torch.nn.Module) -> dict[str, CBAM]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CBAM)}


def test_patch_file_after_conv_saves_beside_input_and_says_where(model_pt: Path):
    res = run(model_pt, "--after", "conv", *SMALL)
    assert res.exit_code == 0, res.output
    out = model_pt.with_name("model_cbam.pt")
    assert out.exists()
    assert f"saved 20 CBAM module(s) to {out}" in res.stdout
    assert "CBAM sites for --after conv: 20 used, 0 skipped" in res.stdout
    assert "Totals" in res.stdout and "multiply-accumulates" in res.stdout
    assert len(_cbams(load_model(out))) == 20
    assert model_pt.read_bytes() == model_pt.with_name("model.pt").read_bytes()


def test_builtin_spec_saves_in_current_directory(tmp_path: Path):
    res = run("torchvision:resnet18", "--after", "block", *SMALL, "-q", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert res.stdout == "resnet18_cbam.pt\n"
    patched = load_model(tmp_path / "resnet18_cbam.pt")
    assert sorted(_cbams(patched)) == [f"layer{i}.{j}.cbam_add" for i in range(1, 5) for j in (0, 1)]


def test_output_flag_and_force(model_pt: Path, tmp_path: Path):
    out = tmp_path / "out.pt"
    assert run(model_pt, *SMALL, "-o", out).exit_code == 0
    stamp = out.stat().st_mtime_ns
    res = run(model_pt, *SMALL, "-o", out)
    assert res.exit_code == 1
    assert res.stderr == f"error: output {out} exists; pass --force to overwrite it\n"
    assert out.stat().st_mtime_ns == stamp
    res = run(model_pt, *SMALL, "-o", out, "--force", "--after", "conv")
    assert res.exit_code == 0, res.output
    assert len(_cbams(load_model(out))) == 20


def test_output_is_never_the_input(model_pt: Path):
    before = model_pt.read_bytes()
    for target in (model_pt, model_pt.parent / "." / "model.pt"):
        res = run(model_pt, *SMALL, "-o", target, "--force")
        assert res.exit_code == 1
        assert "is the input file" in res.stderr
    assert model_pt.read_bytes() == before


def test_dry_run_lists_used_and_skipped_sites_and_writes_nothing(model_pt: Path):
    res = run(model_pt, *SMALL, "--dry-run", "--max-sites", "3")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in model_pt.parent.iterdir()) == ["model.pt"]
    assert res.stdout.count("skipped: beyond max_sites 3") == 5
    assert res.stdout.count("used: residual branch") == 3
    assert "dry run: nothing written" in res.stdout
    assert "Totals" in res.stdout


def test_dry_run_without_any_site_says_why(tmp_path: Path):
    res = run("torchvision:resnet18", *SMALL, "--dry-run", "--after", "block", "--min-channels", "4096", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("skipped: 64 channels < min_channels 4096") == 2
    assert "no site for after='block'" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_json_is_the_only_thing_on_stdout(model_pt: Path):
    res = run(model_pt, "--after", "block", *SMALL, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    out = model_pt.with_name("model_cbam.pt")
    assert data["output"] == str(out) and out.exists()
    assert data["source"] == str(model_pt)
    assert data["params"]["before"] == 11689512
    for part in ("params", "flops"):
        assert all(isinstance(data[part][k], int) for k in ("before", "after", "delta"))
        assert data[part]["after"] - data[part]["before"] == data[part]["delta"] > 0
    assert data["flops"]["unit"] == "MACs"
    sites = data["sites"]
    assert len(sites) == 8 and all(s["used"] for s in sites)
    assert {"name", "kind", "channels", "shape", "spatial", "used", "reason", "params", "flops"} <= set(sites[0])
    assert sum(s["params"] for s in sites) == data["params"]["delta"]
    assert sum(s["flops"] for s in sites) == data["flops"]["delta"]
    assert data["modules"] == [f"layer{i}.{j}.cbam_add" for i in range(1, 5) for j in (0, 1)]
    assert data["untraced"] == [] and data["input"] == {"tuple": [{"shape": [1, 3, 64, 64], "dtype": "float32"}]}


def test_json_dry_run_has_null_output(model_pt: Path):
    res = run(model_pt, *SMALL, "--json", "--dry-run", "--after", "conv")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["output"] is None and data["dry_run"] is True
    assert data["used"] == 20


def test_selection_flags_reach_the_api(model_pt: Path):
    res = run(model_pt, *SMALL, "--json", "--dry-run", "--after", "block", "--stages", "2-3", "--every", "2")
    data = json.loads(res.stdout)
    assert [s["name"] for s in data["sites"] if s["used"]] == ["layer2.0.add", "layer3.0.add"]
    res = run(model_pt, *SMALL, "--json", "--dry-run", "--include", "layer3.*", "--include", "layer4.*",
              "--exclude", "layer4.1.*")  # fmt: skip
    data = json.loads(res.stdout)
    assert [s["name"] for s in data["sites"] if s["used"]] == ["layer3.0.add", "layer3.1.add", "layer4.0.add"]
    res = run(model_pt, *SMALL, "--json", "--dry-run", "--after", "conv", "--min-channels", "256", "--max-sites", "2")
    data = json.loads(res.stdout)
    assert [s["channels"] for s in data["sites"] if s["used"]] == [256, 256]


def test_cbam_options_reach_the_modules(model_pt: Path, tmp_path: Path):
    out = tmp_path / "opts.pt"
    res = run(model_pt, *SMALL, "-o", out, "--reduction", "4", "--kernel-size", "3", "--pool-types", "avg,max,lp",
              "--order", "parallel", "--variant", "official", "--no-mlp-bias", "--init", "identity", "--seed", "1")  # fmt: skip
    assert res.exit_code == 0, res.output
    cbam = _cbams(load_model(out))["layer2.0.cbam_add"]
    assert cbam.channel_gate.hidden == 128 // 4
    assert cbam.channel_gate.pool_types == ["avg", "max", "lp"]
    assert cbam.channel_gate.fc1.bias is None  # --no-mlp-bias overrides the official variant
    assert cbam.spatial_gate.kernel_size == 3 and cbam.spatial_gate.norm is not None
    assert cbam.order == "parallel" and cbam.variant == "official" and cbam.gamma is not None
    out2 = tmp_path / "gates.pt"
    res = run(model_pt, *SMALL, "-o", out2, "--no-spatial", "--hidden", "7")
    assert res.exit_code == 0, res.output
    cbam = _cbams(load_model(out2))["layer1.0.cbam_add"]
    assert cbam.spatial_gate is None and cbam.channel_gate.hidden == 7
    res = run(model_pt, *SMALL, "--dry-run", "--json", "--no-channel")
    assert json.loads(res.stdout)["sites"][0]["params"] == 2 * 49


def test_seed_makes_identical_files(model_pt: Path, tmp_path: Path):
    states = []
    for name in ("a.pt", "b.pt"):
        assert run(model_pt, *SMALL, "--seed", "3", "-o", tmp_path / name).exit_code == 0
        states.append(load_model(tmp_path / name).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_repatch_is_explicit(model_pt: Path, tmp_path: Path):
    once = tmp_path / "once.pt"
    assert run(model_pt, *SMALL, "-o", once).exit_code == 0
    res = run(once, *SMALL, "-o", tmp_path / "same.pt")  # without --repatch: converted, not patched again
    assert res.exit_code == 0 and "without patching again" in res.stdout
    assert len(_cbams(load_model(tmp_path / "same.pt"))) == 8
    res = run(once, *SMALL, "-o", tmp_path / "twice.pt", "--repatch", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["modules"] == [s["module"] for s in data["sites"]] == [
        f"layer{i}.{j}.cbam_add_2" for i in range(1, 5) for j in (0, 1)
    ]
    assert len(_cbams(load_model(tmp_path / "twice.pt"))) == 16


def test_weights_with_arch_and_format(tmp_path: Path):
    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    res = run("--weights", weights, "--arch", "torchvision:resnet18", *SMALL, "--format", "safetensors", "-q")
    assert res.exit_code == 0, res.output
    out = tmp_path / "w_cbam.safetensors"
    assert res.stdout == f"{out}\n"
    assert len(_cbams(load_model(out, arch="torchvision:resnet18"))) == 8
    res = run(weights, "--arch", "torchvision:resnet18", *SMALL, "-o", tmp_path / "b.pt")
    assert res.exit_code == 0, res.output


def test_bench_reports_latency_ratio(model_pt: Path):
    res = run(model_pt, *SMALL, "--dry-run", "--bench", "--json")
    assert res.exit_code == 0, res.output
    bench = json.loads(res.stdout)["bench"]
    assert bench["original_ms"] > 0 and bench["patched_ms"] > 0 and bench["device"] == "cpu"
    assert bench["ratio"] == pytest.approx(bench["patched_ms"] / bench["original_ms"], rel=1e-3)


def _written(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.pt"], "missing.pt: no such file"),
        (["{model}", "--after", "nomatch*"], "pattern 'nomatch*' matches no module"),
        (["{model}", "--include", "layer9.*"], "pattern 'layer9.*' matches no site"),
        (["{model}", "--reduction", "0"], "reduction"),
        (["{model}", "--kernel-size", "4"], "kernel_size must be an odd integer"),
        (["{model}", "--variant", "fancy"], "variant must be one of"),
        (["{model}", "--order", "sideways"], "order must be one of"),
        (["{model}", "--pool-types", "avg,median"], "unknown pooling type 'median'"),
        (["{model}", "--init", "zeros"], "init must be one of"),
        (["{model}", "--no-channel", "--no-spatial"], "cannot both be False"),
        (["{model}", "--stages", "2-x"], "--stages '2-x'"),
        (["{model}", "--stages", "3-2"], "stages must be a range"),
        (["{model}", "--every", "0"], "every must be an integer >= 1"),
        (["{model}", "--input-shape", "1,3,abc"], "--input-shape '1,3,abc'"),
        (["{model}", "--input-shape", "1,1,64,64"], "first layer conv1 (Conv2d) expects (N, 3, H, W)"),
        (["{model}", "--device", "cuda:0"] if not torch.cuda.is_available() else ["{model}", "--device", "warp"],
         "--device"),
        (["{model}", "--format", "gif"], "--format 'gif'"),
        (["{model}", "-o", "{tmp}/no/such/dir/x.pt"], "does not exist"),
        (["{model}", "-o", "{tmp}"], "is a directory"),
        (["{model}", "-o", "{model}/x.pt"], "is not a directory"),
        (["torchvision:nosuchnet"], "unknown torchvision model"),
        (["--weights", "{model}"], "--weights needs --arch"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_user_errors_are_one_line_exit_1_and_write_nothing(model_pt: Path, tmp_path: Path, args, message):
    before = _written(tmp_path)
    args = [a.format(model=model_pt, tmp=tmp_path) for a in args]
    if "--input-shape" not in args:
        args += SMALL
    res = run(*args, cwd=tmp_path)
    assert res.exit_code == 1, res.output
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert _written(tmp_path) == before


def test_long_error_messages_stay_on_one_line(model_pt: Path):
    res = run(model_pt, "--input-shape", "1,1,64,64", "--dry-run")
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and len(res.stderr) > 120


def test_usage_errors_exit_2(model_pt: Path):
    assert run(model_pt, "--no-such-flag").exit_code == 2
    assert run(model_pt, "--reduction", "many").exit_code == 2
    assert run().exit_code == 2
    assert run(model_pt, "--weights", model_pt).exit_code == 2


def test_debug_lets_the_exception_through(model_pt: Path):
    res = run("missing.pt", "--debug")
    assert res.exit_code == 1
    assert type(res.exception).__name__ == "CBAMInsertError"


def test_internal_errors_are_one_line_exit_3(model_pt: Path, monkeypatch):
    from cbam_insert import report

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(report, "cost_report", broken)
    res = run(model_pt, *SMALL, "--dry-run")
    assert res.exit_code == 3
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: internal error: RuntimeError: boom second line") and "--debug" in res.stderr
    res = run(model_pt, *SMALL, "--dry-run", "--debug")
    assert isinstance(res.exception, RuntimeError)


def test_version_and_help():
    res = run("--version")
    assert res.exit_code == 0 and res.stdout == f"cbam-insert {__version__}\n"
    res = run("--help")
    assert res.exit_code == 0
    assert res.stdout.startswith("Usage: cbam-insert [OPTIONS] [SOURCE]")
    text = re.sub(r"(?<=\w)- (?=\w)", "-", " ".join(res.stdout.split()))  # undo the wrapping at hyphens
    for example in ("--after 'layer4.*.bn3'", "--stages 2-4", "--pool-types avg,max,lp", "--input-shape 1,3,64,64",
                    "--arch torchvision:resnet50", "--init identity", "--format safetensors", "--every 2",
                    "--include 'layer3.*'", "--device cuda", "after the relu", "Exit status"):  # fmt: skip
        assert example in text, example


# ----------------------------------------------------------------------------- as a subprocess


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "cbam_insert", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_subprocess_end_to_end_plain_output_and_error(tmp_path: Path):
    proc = _cli("torchvision:resnet18", "--after", "block", *SMALL, "-o", "out.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.pt").exists()
    assert "CBAM sites for --after block: 8 used, 0 skipped" in proc.stdout
    assert proc.stdout.endswith("saved 8 CBAM module(s) to out.pt\n")
    assert "\x1b[" not in proc.stdout + proc.stderr  # no colour, no animation when not a terminal
    assert proc.stderr == ""
    proc = _cli("nothing.pt", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr == "error: nothing.pt: no such file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def test_input_reuse_is_on_by_default_and_survives_save_and_load(model_pt: Path, tmp_path: Path):
    on, off = tmp_path / "on.pt", tmp_path / "off.pt"
    assert run(model_pt, *SMALL, "-o", on, "--seed", "1").exit_code == 0
    res = run(model_pt, *SMALL, "-o", off, "--seed", "1", "--no-reuse-input")
    assert res.exit_code == 0, res.output
    a, b = load_model(on), load_model(off)
    assert all(m.reuse_input for m in _cbams(a).values()) and not any(m.reuse_input for m in _cbams(b).values())
    a.eval(), b.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
