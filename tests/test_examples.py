"""Every script in examples/ runs, at reduced sizes, and prints what its README entry promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    # the console script lives beside the interpreter that has cbam_insert installed
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    cmd = ["bash", *args] if args[0].endswith(".sh") else [sys.executable, *args]
    proc = subprocess.run(
        cmd, check=False, cwd=cwd or EXAMPLES, env=full_env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_train_with_cbam_example_trains_the_patched_model() -> None:
    out = run_example("train_with_cbam.py", "--steps", "4", "--batch-size", "8", "--threads", "1")
    assert "added 8 CBAM modules" in out
    assert "patched model computes the original function (identity init): True" in out
    assert "CBAM gates (0 at insertion):" in out  # the script exits 1 if a gate did not move


def test_cli_walkthrough_example_runs_every_step(tmp_path: Path) -> None:
    out = run_example(
        "cli_walkthrough.sh",
        env={"SHAPE": "1,3,64,64", "EXPORTS": "safetensors torchscript", "WORKDIR": str(tmp_path)},
    )
    assert "8 sites used: layer1.0.add" in out
    assert "same outputs as the original: True" in out
    assert "(exit status 1)" in out
    assert "TorchScript runs without cbam_insert: (1, 1000)" in out
    assert "0 used, 8 skipped" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params"]["after"] > report["params"]["before"] == 11_689_512
    assert {p.name for p in tmp_path.iterdir()} >= {
        "resnet18.pt",
        "resnet18_cbam.pt",
        "resnet18_cbam.safetensors",
        "resnet18_cbam.ts",
    }


def test_rebuild_from_recipe_example_gives_equal_outputs(tmp_path: Path) -> None:
    out = run_example("rebuild_from_recipe.py", "--out-dir", str(tmp_path), "--size", "64")
    assert out.count("OK") == 4 and "MISMATCH" not in out
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["steps"][0]["modules"] == [
        "layer3.0.cbam_add",
        "layer3.1.cbam_add",
        "layer4.0.cbam_add",
        "layer4.1.cbam_add",
    ]
    assert (tmp_path / "patched.pth.recipe.json").exists()


def test_sequence_1d_example_patches_a_conv1d_resnet() -> None:
    out = run_example("sequence_1d.py", "--steps", "3", "--batch-size", "8")
    assert "after=block   6 sites" in out
    assert "inserted 6 CBAM modules, dims=[1]" in out
    assert "identity init keeps the function: True" in out


def test_finetune_digits_quick_shows_identity_init_keeps_accuracy() -> None:
    result = json.loads(run_example("finetune_digits.py", "--quick", "--json", "--after", "block"))
    rows = {(r["after"], r["init"]): r for r in result["rows"]}
    base = rows[("-", "-")]["acc_patched"]
    assert base > 0.5, "the quick run should still learn the digits"
    assert rows[("block", "identity")]["acc_patched"] == pytest.approx(base, abs=1e-9)
    assert rows[("block", "default")]["acc_patched"] < base
    assert rows[("block", "identity")]["sites"] == 6
    assert result["test_size"] == 360


def test_video_3d_example_patches_r3d18_with_3d_cbam() -> None:
    out = run_example("video_3d.py", "--frames", "4", "--size", "32", "--threads", "1")
    assert "8 CBAM modules, dims=[3]" in out
    assert "identity init keeps the function: True" in out
    assert "8 of 8 gates moved" in out
    assert "rebuilt it: equal outputs True" in out


def test_yolo_example_trains_reloads_and_exports_with_cbam(tmp_path: Path) -> None:
    pytest.importorskip("ultralytics")
    out = run_example("yolo_cbam.py", "--workdir", str(tmp_path), "--images", "4", env={"YOLO_OFFLINE": "1"})
    assert "patched: 6 CBAM modules, e.g. model.2.m.0.cv2.cbam" in out
    assert "reloaded with YOLO(path): 6 CBAM modules" in out
    assert "exported:" in out and (tmp_path / "runs" / "train" / "weights" / "best.onnx").exists()
