"""Every mistake a user can make ends the same way: one line on stderr (``error: ...``), a non-zero
exit, no traceback, nothing written, the input untouched.

The CLI runs in process (Typer's CliRunner) for most cases and as a real subprocess for a few;
the API raises ``CBAMInsertError`` with a one-line message. Usage errors (exit 2: a value Typer
itself rejects) print Typer's usage header and then exactly one ``Error:`` line.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from cbam_insert import CBAMInsertError, apply_recipe, insert_cbam, load_model, save_model
from cbam_insert.cli import app

MARKER = "pwned.txt"


class _Evil:
    """Unpickling this runs code that would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of bad (and one good) input files, shared by the cases and never modified."""
    return write_inputs(tmp_path_factory.mktemp("inputs"))


def write_inputs(d: Path) -> Path:
    model = tiny()
    torch.save(model, d / "tiny.pt")
    data = (d / "tiny.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (d / "adir").mkdir()
    torch.save(torch.randn(3, 4), d / "tensor.pt")
    torch.save({"epoch": 3, "optimizer": "sgd", "lr": 0.1}, d / "dict.pt")
    torch.save(model.state_dict(), d / "weights.pth")
    with warnings.catch_warnings():  # TorchScript is deprecated, but users still have such files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), d / "scripted.pt")
    torch.save(_Evil(d / MARKER), d / "evil.pt", pickle_protocol=2)
    with open(d / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(d / MARKER), f)
    return d


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every file under ``dirs`` (hidden ones too) with the SHA-256 of its content."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def assert_one_line_error(code: int, stderr: str, expect: str) -> None:
    assert code != 0, f"exit 0 for a bad input; stderr: {stderr!r}"
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if code == 2:  # a usage error: Typer's header, then one Error line
        lines = [ln for ln in lines if not ln.startswith(("Usage:", "Try "))]
        assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    else:
        assert code == 1, f"exit {code}: {stderr!r}"
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "internal error" not in lines[0], lines[0]
    assert expect.lower() in lines[0].lower(), f"expected {expect!r} in {lines[0]!r}"


# (id, arguments with {d} for the inputs directory and {w} for an empty work directory, expected text)
CLI_CASES = [
    ("missing-file", ["{d}/missing.pt"], "no such file"),
    ("directory", ["{d}/adir"], "directory"),
    ("empty-file", ["{d}/empty.pt"], "empty"),
    ("truncated-archive", ["{d}/truncated.pt"], "truncated.pt"),
    ("random-bytes", ["{d}/random.pt"], "random.pt"),
    ("bare-tensor", ["{d}/tensor.pt"], "tensor"),
    ("unrelated-dict", ["{d}/dict.pt"], "dict.pt"),
    ("state-dict-without-arch", ["{d}/weights.pth"], "--arch"),
    ("torchscript", ["{d}/scripted.pt"], "TorchScript"),
    ("malicious-pickle", ["{d}/evil.pt"], "--trust"),
    ("malicious-plain-pickle", ["{d}/evil.pkl"], "--trust"),
    ("unknown-arch", ["torchvision:resnet999", "-o", "{w}/out.pt"], "resnet999"),
    ("unknown-model-library", ["keras:resnet50", "-o", "{w}/out.pt"], "not a model library"),
    ("weights-without-arch", ["--weights", "{d}/weights.pth", "-o", "{w}/out.pt"], "--arch"),
    ("arch-that-does-not-fit", ["{d}/weights.pth", "--arch", "torchvision:resnet18", "-o", "{w}/out.pt"], "weights.pth"),
    ("malformed-input-shape", ["{d}/tiny.pt", "--after", "conv", "--input-shape", "1,3,abc"], "--input-shape"),
    ("input-shape-too-short", ["{d}/tiny.pt", "--after", "conv", "--input-shape", "1,3"], "--input-shape"),
    ("input-shape-that-does-not-fit", ["{d}/tiny.pt", "--after", "conv", "--input-shape", "1,5,16,16"], "input"),
    ("unknown-placement", ["{d}/tiny.pt", "--after", "blok"], "blok"),
    ("no-site-for-placement", ["{d}/tiny.pt", "--after", "block"], "no site"),
    ("include-matches-nothing", ["{d}/tiny.pt", "--after", "conv", "--include", "layer9.*"], "layer9.*"),
    ("exclude-matches-nothing", ["{d}/tiny.pt", "--after", "conv", "--exclude", "head.*"], "head.*"),
    ("no-channel-and-no-spatial", ["{d}/tiny.pt", "--after", "conv", "--no-channel", "--no-spatial"], "channel"),
    ("source-and-weights", ["{d}/tiny.pt", "--weights", "{d}/weights.pth"], "--weights"),
    ("output-in-missing-directory", ["{d}/tiny.pt", "--after", "conv", "-o", "{w}/nodir/out.pt"], "does not exist"),
    ("output-is-the-input", ["{d}/tiny.pt", "--after", "conv", "-o", "{d}/tiny.pt"], "input"),
    ("output-parent-is-a-file", ["{d}/tiny.pt", "--after", "conv", "-o", "{d}/dict.pt/out.pt"], "dict.pt"),
    ("output-exists-without-force", ["{d}/tiny.pt", "--after", "conv", "-o", "{d}/dict.pt"], "--force"),
    ("output-is-a-directory", ["{d}/tiny.pt", "--after", "conv", "-o", "{d}/adir"], "directory"),
    ("unknown-format", ["{d}/tiny.pt", "--after", "conv", "--format", "h5", "-o", "{w}/out.h5"], "h5"),
    ("reduction-zero", ["{d}/tiny.pt", "--after", "conv", "--reduction", "0"], "reduction"),
    ("reduction-negative", ["{d}/tiny.pt", "--after", "conv", "--reduction", "-4"], "reduction"),
    ("reduction-not-a-number", ["{d}/tiny.pt", "--after", "conv", "--reduction", "abc"], "--reduction"),
    ("even-kernel-size", ["{d}/tiny.pt", "--after", "conv", "--kernel-size", "4"], "kernel_size"),
    ("unknown-variant", ["{d}/tiny.pt", "--after", "conv", "--variant", "paper"], "variant"),
    ("unknown-pool-type", ["{d}/tiny.pt", "--after", "conv", "--pool-types", "avg,median"], "median"),
    ("stages-backwards", ["{d}/tiny.pt", "--after", "conv", "--stages", "3-1"], "stages"),
    ("every-zero", ["{d}/tiny.pt", "--after", "conv", "--every", "0"], "every"),
    ("unknown-device", ["{d}/tiny.pt", "--after", "conv", "--device", "tpu"], "tpu"),
]  # fmt: skip

SUBPROCESS = {"missing-file", "malicious-pickle", "input-shape-that-does-not-fit", "output-parent-is-a-file", "even-kernel-size"}


def _args(args: list[str], d: Path, w: Path) -> list[str]:
    return [a.replace("{d}", str(d)).replace("{w}", str(w)) for a in args]


@pytest.mark.parametrize("case_id,args,expect", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_writes_nothing(
    case_id: str, args: list[str], expect: str, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a default output name would land
    argv = _args(args, inputs, tmp_path)
    before = snapshot(inputs, tmp_path)
    if case_id in SUBPROCESS:
        exe = Path(sys.executable).parent / "cbam-insert"
        proc = subprocess.run([str(exe), *argv], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        code, stderr = proc.returncode, proc.stderr
    else:
        res = CliRunner().invoke(app, argv)
        code, stderr = res.exit_code, res.stderr
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert_one_line_error(code, stderr, expect)
    assert snapshot(inputs, tmp_path) == before, "a bad input must leave every file as it was and write nothing"
    assert not (inputs / MARKER).exists(), "code from the file ran"


def test_suite_covers_at_least_twenty_distinct_cli_errors() -> None:
    assert len({c[0] for c in CLI_CASES}) == len(CLI_CASES) >= 20
    assert len(SUBPROCESS & {c[0] for c in CLI_CASES}) == len(SUBPROCESS)


def _resnet() -> nn.Module:
    return torchvision.models.resnet18()


SMALL = (torch.rand(1, 3, 32, 32),)
API_CASES = [
    ("empty-placement", lambda d: insert_cbam(tiny(), after="", example_inputs=SMALL), "after"),
    ("unknown-placement", lambda d: insert_cbam(tiny(), after="blok", example_inputs=SMALL), "blok"),
    ("reduction-zero", lambda d: insert_cbam(tiny(), after="conv", example_inputs=SMALL, reduction=0), "reduction"),
    ("even-kernel-size", lambda d: insert_cbam(tiny(), after="conv", example_inputs=SMALL, kernel_size=4), "kernel_size"),
    ("unknown-cbam-option", lambda d: insert_cbam(tiny(), after="conv", example_inputs=SMALL, ratio=8), "ratio"),
    ("example-inputs-not-a-tuple", lambda d: insert_cbam(tiny(), after="conv", example_inputs=[SMALL[0]]), "tuple"),
    ("example-inputs-wrong-channels", lambda d: insert_cbam(tiny(), after="conv", example_inputs=(torch.rand(1, 5, 8, 8),)), "example"),
    ("no-conv-to-infer-inputs", lambda d: insert_cbam(nn.Sequential(nn.Linear(4, 4)), after="conv"), "example_inputs"),
    ("stages-backwards", lambda d: insert_cbam(_resnet(), after="block", example_inputs=SMALL, stages=(3, 1)), "stages"),
    ("not-a-recipe", lambda d: apply_recipe(tiny(), {"format": "something-else"}), "recipe"),
    ("recipe-of-another-architecture", lambda d: apply_recipe(
        torchvision.models.resnet34(), insert_cbam(_resnet(), after="block", example_inputs=SMALL).cbam_recipe), "recipe"),
    ("load-missing-file", lambda d: load_model(d / "missing.pt"), "no such file"),
    ("load-malicious-pickle", lambda d: load_model(d / "evil.pt"), "trust"),
    ("load-bare-tensor", lambda d: load_model(d / "tensor.pt"), "tensor"),
    ("load-unknown-arch", lambda d: load_model("torchvision:resnet999"), "resnet999"),
    ("save-into-missing-directory", lambda d: save_model(tiny(), d / "nodir" / "x.pt"), "does not exist"),
    ("save-unknown-format", lambda d: save_model(tiny(), d / "x.pt", format="h5"), "h5"),
    ("save-where-the-parent-is-a-file", lambda d: save_model(tiny(), d / "dict.pt" / "x.pt"), "dict.pt"),
    ("save-over-existing-without-force", lambda d: save_model(tiny(), d / "dict.pt", force=False), "exists"),
]  # fmt: skip


@pytest.mark.parametrize("case_id,call,expect", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_cbam_insert_error_with_one_line(case_id: str, call, expect: str, inputs: Path) -> None:
    before = snapshot(inputs)
    with pytest.raises(CBAMInsertError) as info:
        call(inputs)
    message = str(info.value)
    assert message and "\n" not in message, message
    assert expect.lower() in message.lower(), message
    assert snapshot(inputs) == before
    assert not (inputs / MARKER).exists()
