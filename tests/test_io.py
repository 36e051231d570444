"""Loading and saving: the safe unpickler, the tool's own formats, exports, atomic writes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from cbam_insert import CBAMInsertError, insert_cbam, load_model, save_model
from cbam_insert.formats import RECIPE_SUFFIX

X = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return tvm.resnet18().eval()


@pytest.fixture(scope="module")
def patched(resnet: nn.Module) -> nn.Module:
    return insert_cbam(resnet, after="block", example_inputs=(torch.rand(1, 3, 64, 64),), seed=0).eval()


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CBAMInsertError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------- the tool's own formats


def test_pt_roundtrip_rebuilds_patched_model_with_identical_outputs(patched, tmp_path):
    path = save_model(patched, tmp_path / "p.pt")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert not [n for n in names if n.startswith(("torch.fx", "torch.jit"))], names  # no pickled code
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.cbam_recipe == patched.cbam_recipe
    assert loaded.state_dict().keys() == patched.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded(X), patched(X))


def test_pt_roundtrip_keeps_train_mode(patched, tmp_path):
    patched.train()
    try:
        save_model(patched, tmp_path / "p.pt")
    finally:
        patched.eval()
    loaded = load_model(tmp_path / "p.pt")
    assert loaded.training
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), patched(X))


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_weights_with_recipe_rebuild_patched_model_on_arch(patched, tmp_path, name):
    path = save_model(patched, tmp_path / name)
    if name.endswith(".pth"):
        side = tmp_path / f"{name}{RECIPE_SUFFIX}"
        assert json.loads(side.read_text())["steps"] == patched.cbam_recipe["steps"]
        assert isinstance(torch.load(path, weights_only=True), dict)  # a plain state dict
    loaded = load_model(path, arch="torchvision:resnet18").eval()
    assert loaded.cbam_report.modules == patched.cbam_report.modules
    with torch.no_grad():
        assert torch.equal(loaded(X), patched(X))


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_plain_weights_load_into_arch(resnet, tmp_path, name):
    save_model(resnet, tmp_path / name)
    assert not (tmp_path / f"{name}{RECIPE_SUFFIX}").exists()
    loaded = load_model(tmp_path / name, arch="torchvision:resnet18").eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), resnet(X))


class ScaledNet(nn.Module):
    """A model with a non-persistent buffer: not in the state dict, so the pt file must keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 16).view(1, 16, 1, 1), persistent=False)

    def forward(self, x):
        return self.bn(self.conv(x)).relu() * self.scale


def test_pt_roundtrip_keeps_non_persistent_buffers_and_user_classes(tmp_path):
    patched = insert_cbam(ScaledNet().eval(), after="conv", example_inputs=(X,), seed=0).eval()
    save_model(patched, tmp_path / "s.pt")
    loaded = load_model(tmp_path / "s.pt")
    assert torch.equal(loaded.scale, patched.scale)
    with torch.no_grad():
        assert torch.equal(loaded(X), patched(X))
    save_model(patched, tmp_path / "s.safetensors")
    rebuilt = load_model(tmp_path / "s.safetensors", arch=ScaledNet()).eval()  # arch may be a fresh module
    with torch.no_grad():
        assert torch.equal(rebuilt(X), patched(X))


def test_state_dict_without_arch_says_how_to_give_it(resnet, tmp_path):
    torch.save(resnet.state_dict(), tmp_path / "w.pth")
    msg = _one_line_error(load_model, tmp_path / "w.pth")
    assert "state dict" in msg and "--arch torchvision:NAME" in msg
    save_model(resnet, tmp_path / "w.safetensors")
    assert "--arch torchvision:NAME" in _one_line_error(load_model, tmp_path / "w.safetensors")


def test_cbam_weights_without_recipe_name_the_missing_recipe(patched, tmp_path):
    torch.save(patched.state_dict(), tmp_path / "w.pth")
    msg = _one_line_error(load_model, tmp_path / "w.pth", arch="torchvision:resnet18")
    assert "no recipe" in msg and f"w.pth{RECIPE_SUFFIX}" in msg


def test_a_recipe_for_another_arch_or_a_damaged_one_is_one_line(patched, tmp_path):
    save_model(patched, tmp_path / "w.pth")
    msg = _one_line_error(load_model, tmp_path / "w.pth", arch="torchvision:resnet34")
    assert "does not fit" in msg and "w.pth" in msg
    side = tmp_path / f"w.pth{RECIPE_SUFFIX}"
    recipe = json.loads(side.read_text())
    recipe["steps"][0]["example_inputs"] = {"tuple": [{"shape": [10**6, 3, 10**4, 10**4], "dtype": "float32"}]}
    side.write_text(json.dumps(recipe))
    assert "too large" in _one_line_error(load_model, tmp_path / "w.pth", arch="torchvision:resnet18")
    side.write_text(json.dumps({"format": "cbam-insert/recipe", "version": 1, "steps": [{"after": 3}]}))
    assert "malformed" in _one_line_error(load_model, tmp_path / "w.pth", arch="torchvision:resnet18")
    side.write_text("{not json")
    assert "not a readable recipe" in _one_line_error(load_model, tmp_path / "w.pth", arch="torchvision:resnet18")


def test_weights_for_another_arch_are_refused(resnet, tmp_path):
    torch.save(resnet.state_dict(), tmp_path / "w.pth")
    msg = _one_line_error(load_model, tmp_path / "w.pth", arch="torchvision:resnet34")
    assert "do not fit" in msg and "missing" in msg


def test_training_checkpoint_state_dict_entry_loads(resnet, tmp_path):
    torch.save({"epoch": 3, "state_dict": resnet.state_dict()}, tmp_path / "ckpt.pth")
    loaded = load_model(tmp_path / "ckpt.pth", arch="torchvision:resnet18").eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), resnet(X))


# ----------------------------------------------------------------------------- safe unpickling


class _Evil:
    """Unpickling this calls ``fn(*args)``: the classic pickle code-execution payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


PAYLOADS = {
    "builtins.exec": lambda m: _Evil(exec, _touch_code(m)),
    "builtins.eval": lambda m: _Evil(eval, f"__import__('pathlib').Path({str(m)!r}).touch()"),
    "posix.system": lambda m: _Evil(os.system, f"touch {m}"),
    "subprocess.call": lambda m: _Evil(subprocess.call, ["touch", str(m)]),
}


@pytest.mark.parametrize("ref", sorted(PAYLOADS))
def test_malicious_pickle_never_runs_without_trust(resnet, tmp_path, ref):
    marker = tmp_path / "marker"
    model = tvm.resnet18()
    model.payload = PAYLOADS[ref](marker)  # hidden inside an otherwise ordinary model
    torch.save(model, tmp_path / "evil.pt")
    msg = _one_line_error(load_model, tmp_path / "evil.pt")
    assert ref in msg and "--trust" in msg
    assert not marker.exists()


def test_trust_opts_in_to_the_full_unpickler(tmp_path):
    marker = tmp_path / "marker"
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.payload = PAYLOADS["builtins.exec"](marker)
    torch.save(model, tmp_path / "evil.pt")
    _one_line_error(load_model, tmp_path / "evil.pt")
    assert not marker.exists()
    loaded = load_model(tmp_path / "evil.pt", trust=True)
    assert marker.exists() and isinstance(loaded, nn.Sequential)


def test_a_pickle_that_calls_a_module_class_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.extra = _Evil(nn.Linear, 2, 2)  # REDUCE runs Linear.__init__: a call, not a restore
    torch.save(model, tmp_path / "m.pt")
    msg = _one_line_error(load_model, tmp_path / "m.pt")
    assert "torch.nn.modules.linear.Linear" in msg and "it calls" in msg


def test_partial_of_a_function_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.hook = functools.partial(exec, "1")
    torch.save(model, tmp_path / "m.pt")
    assert "builtins.exec" in _one_line_error(load_model, tmp_path / "m.pt")


class TinyNet(nn.Module):
    """A user's own model class, importable from where it is defined."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = functools.partial(nn.BatchNorm2d, eps=1e-3)

    def forward(self, x):
        return self.conv(x).relu()


def test_user_module_class_and_layer_partial_load_without_trust(tmp_path):
    net = TinyNet().eval()
    torch.save(net, tmp_path / "net.pt")
    loaded = load_model(tmp_path / "net.pt")
    assert type(loaded) is TinyNet and loaded.norm.func is nn.BatchNorm2d
    assert torch.equal(loaded(X), net(X))


def test_newer_pickle_protocols_load_too(tmp_path):
    for protocol in (3, 4, 5):
        torch.save(nn.Conv2d(3, 4, 3), tmp_path / "m.pt", pickle_protocol=protocol)
        loaded = load_model(tmp_path / "m.pt")
        assert isinstance(loaded, nn.Conv2d) and loaded.weight.shape == (4, 3, 3, 3)


def test_pre_zip_format_loads_weights_and_models_under_the_same_rules(resnet, tmp_path):
    torch.save(resnet.state_dict(), tmp_path / "w.pth", _use_new_zipfile_serialization=False)
    loaded = load_model(tmp_path / "w.pth", arch="torchvision:resnet18").eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), resnet(X))
    torch.save(resnet, tmp_path / "m.pt", _use_new_zipfile_serialization=False)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m.pt").eval()(X), resnet(X))
    evil = nn.Sequential(nn.Conv2d(3, 4, 3))
    evil.payload = PAYLOADS["builtins.exec"](tmp_path / "marker")
    torch.save(evil, tmp_path / "e.pt", _use_new_zipfile_serialization=False)
    assert "builtins.exec" in _one_line_error(load_model, tmp_path / "e.pt")
    assert not (tmp_path / "marker").exists()


def test_resnet_saved_with_torch_save_loads_without_trust(resnet, tmp_path):
    torch.save(resnet, tmp_path / "r.pt")
    loaded = load_model(tmp_path / "r.pt")
    assert type(loaded) is tvm.ResNet
    with torch.no_grad():
        assert torch.equal(loaded(X), resnet(X))


@contextlib.contextmanager
def _meta_parameters():
    """Build models with parameters on the meta device: the same pickled references, no weight data."""
    register = nn.Module.register_parameter

    def to_meta(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


ZOO = (
    [("classification", n) for n in tvm.list_models(tvm)]
    + [("segmentation", n) for n in tvm.list_models(tvm.segmentation)]
    + [("video", n) for n in tvm.list_models(tvm.video)]
    + [("detection", n) for n in tvm.list_models(tvm.detection)]
    + [("optical_flow", n) for n in tvm.list_models(tvm.optical_flow)]
)
_REAL_BUILD = {"ssdlite320_mobilenet_v3_large"}  # its __init__ mixes real and new tensors; small enough to build


@pytest.mark.slow
@pytest.mark.parametrize(("group", "name"), ZOO, ids=[n for _, n in ZOO])
def test_every_torchvision_model_loads_without_trust(tmp_path, group, name):
    """The pickle names the same classes whatever the weights are, so weights on the meta device keep
    the sweep fast (regnet_y_128gf, vit_h_14 included); ``test_real_weights_…`` covers real tensors."""
    kwargs = {"weights": None} | ({"weights_backbone": None} if group in ("segmentation", "detection") else {})
    with contextlib.nullcontext() if name in _REAL_BUILD else _meta_parameters():
        model = tvm.get_model(name, **kwargs)
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert type(loaded) is type(model)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert loaded.state_dict().keys() == model.state_dict().keys()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs"), [("vit_b_32", {}), ("lraspp_mobilenet_v3_large", {"weights_backbone": None}),
                                              ("s3d", {})])  # fmt: skip
def test_real_weights_of_each_group_load_without_trust(tmp_path, name, kwargs):
    model = tvm.get_model(name, weights=None, **kwargs)
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


@pytest.mark.slow
def test_partially_traced_detector_roundtrips_through_every_weights_format(tmp_path):
    model = tvm.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None).eval()
    patched = insert_cbam(model, after="block", seed=0).eval()
    assert patched.cbam_report.untraced  # the detector as a whole is not traceable; its backbone is
    images = [torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        ref = patched(images)[0]
    for name in ("d.pt", "d.pth", "d.safetensors"):
        save_model(patched, tmp_path / name)
        arch = None if name == "d.pt" else "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
        loaded = load_model(tmp_path / name, arch=arch).eval()
        with torch.no_grad():
            got = loaded(images)[0]
        assert all(torch.equal(got[k], ref[k]) for k in ref), name


# ----------------------------------------------------------------------------- inputs that are not models


def _bad_inputs(tmp: Path, resnet: nn.Module) -> dict[str, tuple[Path, str]]:
    good = tmp / "good.pt"
    torch.save(resnet, good)
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp / "corrupt.pt").write_bytes(b"this is not a model" * 10)
    (tmp / "adir").mkdir()
    torch.save(torch.zeros(2, 3), tmp / "tensor.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp / "dict.pt")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp / "m.ts")
    torch.export.save(torch.export.export(nn.Linear(2, 2), (torch.rand(1, 2),)), tmp / "m.pt2")
    (tmp / "m.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    (tmp / "cut.safetensors").write_bytes(b'\x40\x00\x00\x00\x00\x00\x00\x00{"a": {"dtype"')
    return {
        "missing": (tmp / "nope.pt", "no such file"),
        "empty": (tmp / "empty.pt", "empty"),
        "truncated": (tmp / "truncated.pt", "truncated"),
        "corrupt": (tmp / "corrupt.pt", "not a model file"),
        "directory": (tmp / "adir", "directory"),
        "bare tensor": (tmp / "tensor.pt", "single tensor"),
        "unrelated dict": (tmp / "dict.pt", "neither a model nor a state dict"),
        "torchscript": (tmp / "m.ts", "TorchScript"),
        "pt2": (tmp / "m.pt2", "torch.export"),
        "onnx": (tmp / "m.onnx", "ONNX"),
        "truncated safetensors": (tmp / "cut.safetensors", "corrupt"),
    }


def test_inputs_that_are_not_models_get_one_clear_line_each(resnet, tmp_path):
    for case, (path, words) in _bad_inputs(tmp_path, resnet).items():
        msg = _one_line_error(load_model, path)
        assert words in msg, (case, msg)


# ----------------------------------------------------------------------------- exports


def test_torchscript_and_pt2_run_where_cbam_insert_cannot_be_imported(patched, tmp_path):
    save_model(patched, tmp_path / "m.ts")
    save_model(patched, tmp_path / "m.pt2")
    torch.save(X, tmp_path / "x.pt")
    script = (
        "import sys\n"
        "sys.modules['cbam_insert'] = None\n"
        "try:\n    import cbam_insert\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('cbam_insert importable')\n"
        "import torch\n"
        "x = torch.load('x.pt')\n"
        "torch.save({'ts': torch.jit.load('m.ts')(x), 'pt2': torch.export.load('m.pt2').module()(x)}, 'out.pt')\n"
    )
    subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, check=True, timeout=300)
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        ref = patched(X)
    torch.testing.assert_close(out["ts"], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["pt2"], ref, rtol=0, atol=1e-6)


def test_onnx_matches_pytorch_in_onnxruntime(patched, tmp_path):
    import onnxruntime as ort

    save_model(patched, tmp_path / "m.onnx")
    assert _leftovers(tmp_path) == ["m.onnx"]  # one self-contained file
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = patched(x).numpy()
    assert abs(got - ref).max() < 1e-4


def test_export_uses_given_example_inputs(resnet, tmp_path):
    save_model(resnet, tmp_path / "r.ts", example_inputs=(torch.rand(2, 3, 32, 32),))
    traced = torch.jit.load(tmp_path / "r.ts")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(traced(x), resnet(x), atol=1e-6)


# ----------------------------------------------------------------------------- writing


def test_format_comes_from_the_extension_or_must_be_given(resnet, tmp_path):
    assert "--format" in _one_line_error(save_model, resnet, tmp_path / "m.bin")
    assert "unknown format" in _one_line_error(save_model, resnet, tmp_path / "m.pt", format="zip")
    save_model(resnet, tmp_path / "m.bin", format="state-dict")
    assert isinstance(torch.load(tmp_path / "m.bin", weights_only=True), dict)


def test_foreign_graph_module_is_not_pickled(resnet, tmp_path):
    gm = torch.fx.symbolic_trace(resnet)
    msg = _one_line_error(save_model, gm, tmp_path / "g.pt")
    assert "state-dict" in msg and "onnx" in msg
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_save_leaves_no_file_and_keeps_the_old_one(resnet, tmp_path, monkeypatch, exc):
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise exc

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(type(exc)):
        save_model(resnet, tmp_path / "new.pt")
    assert _leftovers(tmp_path) == []
    (tmp_path / "old.pt").write_bytes(b"old")
    with pytest.raises(type(exc)):
        save_model(resnet, tmp_path / "old.pt")
    assert _leftovers(tmp_path) == ["old.pt"] and (tmp_path / "old.pt").read_bytes() == b"old"


def test_force_false_refuses_an_existing_file(resnet, tmp_path):
    (tmp_path / "out.pt").write_bytes(b"old")
    assert "--force" in _one_line_error(save_model, resnet, tmp_path / "out.pt", force=False)
    assert (tmp_path / "out.pt").read_bytes() == b"old"
    save_model(resnet, tmp_path / "out.pt")
    assert isinstance(load_model(tmp_path / "out.pt"), tvm.ResNet)


def test_saved_files_get_ordinary_permissions(resnet, tmp_path):
    path = save_model(resnet, tmp_path / "m.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
