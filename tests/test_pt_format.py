"""The tool's .pt file: plain torch.load returns the patched model; load_model reads it without
running the file's code; files of the earlier layout still load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from cbam_insert import CBAM, CBAMInsertError, insert_cbam, load_model, save_model
from cbam_insert import patched as patched_format
from cbam_insert.meta import meta_copy

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def patched() -> nn.Module:
    torch.manual_seed(0)
    model = tvm.resnet18().eval()
    return insert_cbam(model, after="block", example_inputs=(torch.rand(1, 3, 64, 64),), seed=0).eval()


@pytest.fixture(scope="module")
def saved(patched: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(patched, tmp_path_factory.mktemp("pt") / "r18_cbam.pt")


def test_plain_torch_load_returns_the_patched_model(patched, saved):
    loaded = torch.load(saved, weights_only=False)
    assert isinstance(loaded, nn.Module)
    assert sum(isinstance(m, CBAM) for m in loaded.modules()) == 8
    assert loaded.state_dict().keys() == patched.state_dict().keys()
    assert loaded.cbam_recipe == patched.cbam_recipe
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(X), patched(X))


def test_plain_torch_load_result_saves_and_loads_again(patched, saved, tmp_path):
    again = save_model(torch.load(saved, weights_only=False), tmp_path / "again.pt")
    with torch.no_grad():
        assert torch.equal(load_model(again)(X), patched(X))


def test_plain_torch_load_in_a_fresh_process(patched, saved, tmp_path):
    """The file names only cbam_insert's entry point: a new interpreter with cbam_insert importable loads it."""
    ref = tmp_path / "ref.pt"
    with torch.no_grad():
        torch.save(patched(X), ref)
    code = (
        "import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
        "x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)); "
        "torch.set_grad_enabled(False); print(torch.equal(m(x), torch.load(sys.argv[2])), type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(saved), str(ref)], capture_output=True, text=True, check=True,
                         timeout=300)  # fmt: skip
    assert out.stdout.split()[0] == "True", out.stderr


def test_load_model_never_calls_the_files_entry_point(patched, saved, monkeypatch):
    """The safe loader resolves the entry point to a data check; the rebuild is the loader's own."""

    def boom(payload):
        raise AssertionError("load_model called the file's entry point")

    monkeypatch.setattr(patched_format, "rebuild", boom)
    loaded = load_model(saved)
    with torch.no_grad():
        assert torch.equal(loaded(X), patched(X))


def test_the_file_names_no_code_but_the_entry_point(saved):
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(saved))
    callables = [n for n in names if not n.startswith(("torch.nn.modules", "torchvision.models"))]
    assert callables == [patched_format.ENTRY_POINT]


class _Reduce:
    """Pickles as ``func(*args)``, to craft files that call the entry point with other arguments."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(CBAMInsertError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_crafted_payload_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save(_Reduce(patched_format.rebuild, {"cbam_insert": {}, "cmd": "rm -rf /"}), bad)
    assert "damaged cbam-insert file" in _one_line(load_model, bad)
    torch.save(_Reduce(patched_format.rebuild, {"cbam_insert": {"format": "pt", "version": 2}, "base": 1,
                                                 "recipe": "{}", "state_dict": {}}), bad)  # fmt: skip
    assert "damaged" in _one_line(load_model, bad)


def test_a_payload_holding_code_is_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.pt"
    payload = {"cbam_insert": {"format": "pt", "version": 2}, "base": _Reduce(print, "pwned"), "recipe": "{}",
               "state_dict": {}}  # fmt: skip
    torch.save(_Reduce(patched_format.rebuild, payload), bad)
    msg = _one_line(load_model, bad)
    assert "refused" in msg and "builtins.print" in msg


def test_the_entry_point_with_two_arguments_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save(_Reduce(patched_format.rebuild, {}, {}), bad)
    assert _one_line(load_model, bad)


def test_files_of_the_earlier_layout_still_load(patched, tmp_path):
    """Version 1 stored the payload dict itself at the top of the pickle."""
    old = tmp_path / "v1.pt"
    payload = {
        "cbam_insert": {"format": "pt", "version": 1, "training": False},
        "base": patched.__dict__["_cbam_base"],
        "recipe": json.dumps(patched.cbam_recipe),
        "state_dict": patched.state_dict(),
    }
    torch.save(payload, old)
    with torch.no_grad():
        assert torch.equal(load_model(old)(X), patched(X))


def test_a_newer_file_version_says_upgrade(patched, tmp_path):
    new = tmp_path / "v9.pt"
    payload = {"cbam_insert": {"format": "pt", "version": 9}, "base": meta_copy(tvm.resnet18(), keep_non_persistent=True),
               "recipe": json.dumps(patched.cbam_recipe), "state_dict": patched.state_dict()}  # fmt: skip
    torch.save(patched_format.wrap(payload), new)
    assert "newer cbam-insert" in _one_line(load_model, new)
