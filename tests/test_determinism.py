"""Determinism: the same call or command twice gives the same module names, recipe and (with a
seed) the same weights, through the API, the CLI in-process and the CLI in separate processes
with different hash seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from cbam_insert import CBAM, insert_cbam, load_model
from cbam_insert.cli import app

SMALL = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)


def cbam_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, CBAM)]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


@pytest.mark.parametrize("after", ["conv", "block", "stage", "layer[34].*.bn2"])
def test_same_call_twice_gives_the_same_module_names_and_recipe(after: str) -> None:
    model = torchvision.models.resnet18()
    first = insert_cbam(model, after=after, example_inputs=SMALL)
    second = insert_cbam(model, after=after, example_inputs=SMALL)
    assert cbam_names(first) == cbam_names(second)
    assert first.cbam_report.modules == second.cbam_report.modules
    assert sorted(first.cbam_report.modules) == sorted(cbam_names(first))
    assert list(first.state_dict()) == list(second.state_dict())
    assert json.dumps(first.cbam_recipe, sort_keys=True) == json.dumps(second.cbam_recipe, sort_keys=True)


def test_seed_gives_identical_weights_whatever_the_global_rng_and_leaves_it_alone() -> None:
    model = torchvision.models.resnet18()
    torch.manual_seed(1)
    first = insert_cbam(model, after="block", example_inputs=SMALL, seed=7)
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    second = insert_cbam(model, after="block", example_inputs=SMALL, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state), "seed= must not consume the global RNG"
    assert_same_state(first.state_dict(), second.state_dict())
    other = insert_cbam(model, after="block", example_inputs=SMALL, seed=8)
    assert not torch.equal(first.state_dict()["layer1.0.cbam_add.channel_gate.fc1.weight"],
                           other.state_dict()["layer1.0.cbam_add.channel_gate.fc1.weight"])  # fmt: skip


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("determinism") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(), path)
    return path


def _cli(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("source", ["file", "torchvision:resnet18"])
def test_cli_twice_in_process_gives_identical_names_and_with_seed_identical_state_dicts(
    source: str, model_file: Path, tmp_path: Path
) -> None:
    src = str(model_file) if source == "file" else source
    common = [src, "--after", "block", "--input-shape", "1,3,64,64", "--quiet"]
    for name in ("a", "b"):
        _cli([*common, "-o", str(tmp_path / f"{name}.pt")])
        _cli([*common, "--seed", "3", "-o", str(tmp_path / f"{name}_seeded.pt")])
    a, b = load_model(tmp_path / "a.pt"), load_model(tmp_path / "b.pt")
    assert cbam_names(a) == cbam_names(b) and len(cbam_names(a)) == 8
    seeded_a, seeded_b = load_model(tmp_path / "a_seeded.pt"), load_model(tmp_path / "b_seeded.pt")
    assert cbam_names(seeded_a) == cbam_names(a)
    assert_same_state(seeded_a.state_dict(), seeded_b.state_dict())


def test_cli_in_separate_processes_with_different_hash_seeds_writes_identical_weights(model_file: Path, tmp_path: Path) -> None:
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        cmd = [str(Path(sys.executable).parent / "cbam-insert"), str(model_file), "--after", "conv", "--seed", "0",
               "--input-shape", "1,3,64,64", "--quiet", "-o", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs.append(out)
    first = load_model(outputs[0], arch="torchvision:resnet18")
    second = load_model(outputs[1], arch="torchvision:resnet18")
    assert cbam_names(first) == cbam_names(second) and len(cbam_names(first)) == 20
    assert_same_state(first.state_dict(), second.state_dict())
