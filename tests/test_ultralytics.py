"""Ultralytics YOLO with CBAM through Ultralytics' own predict (fused), val, train (EMA, final
validation), checkpoints and export; detect, segment and classify. Models from YAML, tiny
datasets made at run time, imgsz 64, one epoch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
ultralytics = pytest.importorskip("ultralytics")

from _yolo_data import classify_dataset, detect_dataset
from ultralytics import YOLO

from cbam_insert import CBAM, CBAMInsertError, load_model
from cbam_insert.integrations import ultralytics as ucbam

IMG = 64
TRAIN = {"epochs": 1, "imgsz": IMG, "batch": 4, "workers": 0, "amp": False, "plots": False, "verbose": False,
         "exist_ok": True}  # fmt: skip


def _count(model: torch.nn.Module) -> int:
    return sum(isinstance(m, CBAM) for m in model.modules())


def _cbam_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float().clone() for k, v in model.state_dict().items() if ".cbam." in k}


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The feature maps the head reads, flattened (a random head's outputs are nearly constant)."""
    got: list[torch.Tensor] = []
    head = model.model[-1]
    handle = head.register_forward_pre_hook(lambda m, args: got.extend(torch.utils._pytree.tree_leaves(args)))
    try:
        _out(model, x)
    finally:
        handle.remove()
    return torch.cat([t.flatten() for t in got])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        y = model(x)
    return y[0] if isinstance(y, (list, tuple)) else y


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return detect_dataset(tmp_path_factory.mktemp("yolo") / "data")


def test_patch_yolo_adds_cbam_on_residual_branches_and_keeps_every_original_key():
    yolo = YOLO("yolov8n.yaml")
    before = list(yolo.model.state_dict())
    ucbam.patch_yolo(yolo, after="block", seed=0, reduction=8)
    names = ucbam.cbam_modules(yolo.model)
    assert names == [f"model.{i}.m.{j}.cv2.cbam" for i, n in ((2, 1), (4, 2), (6, 2), (8, 1)) for j in range(n)]
    after = list(yolo.model.state_dict())
    assert [k for k in after if ".cbam." not in k] == before
    assert yolo.model.cbam_yolo["sites"][0] == {"module": "model.2.m.0.cv2", "channels": 16, "cbam": {"reduction": 8}}


def test_conv_placement_and_errors():
    yolo = ucbam.patch_yolo(YOLO("yolov8n.yaml"), after="conv", seed=0)
    head = f"model.{len(yolo.model.model) - 1}."
    names = ucbam.cbam_modules(yolo.model)
    assert len(names) > 40 and not any(n.startswith(head) for n in names)
    with pytest.raises(CBAMInsertError, match="unknown CBAM option"):
        ucbam.patch_yolo(YOLO("yolov8n.yaml"), bogus=1)
    with pytest.raises(CBAMInsertError, match="expects an ultralytics.YOLO"):
        ucbam.patch_yolo(torch.nn.Linear(2, 2))


def test_predict_fuses_and_keeps_cbam_applied(data):
    yolo = ucbam.patch_yolo(YOLO("yolov8n.yaml"), seed=0)
    x = torch.rand(1, 3, IMG, IMG)
    unfused = _features(yolo.model, x)
    yolo.predict(str(data.parent / "images" / "train" / "0.jpg"), imgsz=IMG, verbose=False)
    fused = yolo.predictor.model.model  # the predictor's deep copy, fused by Ultralytics
    assert fused.is_fused() and _count(fused) == 6
    assert _rel(_features(fused, x), unfused) < 1e-3
    plain = YOLO("yolov8n.yaml").model  # the same weights without CBAM compute something else: the hooks run
    plain.load_state_dict({k: v for k, v in yolo.model.state_dict().items() if ".cbam." not in k})
    assert _rel(_features(plain, x), unfused) > 1e-2


def test_train_keeps_cbam_through_ema_checkpoints_and_final_validation(data, tmp_path):
    yolo = ucbam.patch_yolo(YOLO("yolov8n.yaml"), seed=0)
    initial = _cbam_state(yolo.model)
    seen: dict[str, object] = {"hook_calls": []}
    calls = [0]
    original_forward = ucbam.CBAMHook.forward

    def counting(self, module, args, output):
        calls[0] += 1
        return original_forward(self, module, args, output)

    def on_train_start(trainer):
        seen["model"] = _count(trainer.model)
        seen["ema"] = _count(trainer.ema.ema)

    def on_fit_epoch_end(trainer):
        seen["hook_calls"].append(calls[0])  # after the epoch's validation, and after the final one

    yolo.add_callback("on_train_start", on_train_start)
    yolo.add_callback("on_fit_epoch_end", on_fit_epoch_end)
    ucbam.CBAMHook.forward = counting
    try:
        yolo.train(data=str(data), project=str(tmp_path), name="run", **TRAIN)
    finally:
        ucbam.CBAMHook.forward = original_forward
    assert seen["model"] == seen["ema"] == 6
    first, final = seen["hook_calls"]
    assert final > first, "the final validation of best.pt ran CBAM"
    best = tmp_path / "run" / "weights" / "best.pt"
    assert _count(yolo.model) == 6  # the model train() leaves on the YOLO object is the checkpoint's
    reloaded = YOLO(str(best))
    assert _count(reloaded.model) == 6
    trained = _cbam_state(reloaded.model)
    assert trained.keys() == initial.keys()
    assert any(not torch.allclose(trained[k], initial[k]) for k in trained), "CBAM weights were trained"
    x = torch.rand(1, 3, IMG, IMG)
    assert torch.allclose(_out(reloaded.model, x), _out(yolo.model, x), atol=1e-3)
    reloaded.val(data=str(data), imgsz=IMG, batch=4, workers=0, plots=False, verbose=False, project=str(tmp_path))
    assert _count(reloaded.model) == 6
    # a reloaded checkpoint trains on with its CBAM once patch_yolo has seen it again
    ucbam.patch_yolo(reloaded)
    assert _count(reloaded.model) == 6
    reloaded.train(data=str(data), project=str(tmp_path), name="again", **TRAIN)
    assert _count(YOLO(str(tmp_path / "again" / "weights" / "last.pt")).model) == 6


def _sigmoids_torchscript(path: str) -> int:
    return sum(n.kind() == "aten::sigmoid" for n in torch.jit.load(path).inlined_graph.nodes())


def test_export_keeps_cbam(data, tmp_path, monkeypatch):
    """Each CBAM adds two sigmoids (channel and spatial gates) to the exported graph, and the
    exported model computes what the PyTorch one does."""
    monkeypatch.chdir(tmp_path)  # a model built from YAML exports to ./yolov8n.*
    yolo = ucbam.patch_yolo(YOLO("yolov8n.yaml"), seed=0)
    plain = YOLO("yolov8n.yaml")
    yolo.model.eval()
    x = torch.rand(1, 3, IMG, IMG)
    ref = _out(yolo.model, x)
    plain_sigmoids = _sigmoids_torchscript(plain.export(format="torchscript", imgsz=IMG))
    ts = yolo.export(format="torchscript", imgsz=IMG)
    assert _sigmoids_torchscript(ts) - plain_sigmoids == 2 * 6
    got = torch.jit.load(ts)(x)
    got = got[0] if isinstance(got, (list, tuple)) else got
    assert _rel(got, ref) < 1e-4
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")

    def sigmoids(p: str) -> int:
        return sum(n.op_type == "Sigmoid" for n in onnx.load(p).graph.node)

    plain_sigmoids = sigmoids(plain.export(format="onnx", imgsz=IMG, simplify=False))
    path = yolo.export(format="onnx", imgsz=IMG, simplify=False)
    assert sigmoids(path) - plain_sigmoids == 2 * 6
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert _rel(torch.from_numpy(out), ref) < 1e-4


@pytest.mark.parametrize("task", ["segment", "classify"])
def test_segment_and_classify_train_and_reload_with_cbam(task, tmp_path):
    if task == "segment":
        yolo, data = YOLO("yolov8n-seg.yaml"), str(detect_dataset(tmp_path / "data", segment=True))
    else:
        yolo, data = YOLO("yolov8n-cls.yaml"), str(classify_dataset(tmp_path / "data"))
    ucbam.patch_yolo(yolo, seed=0)
    n = _count(yolo.model)
    assert n > 0
    yolo.train(data=data, project=str(tmp_path), name="run", **TRAIN)
    reloaded = YOLO(str(tmp_path / "run" / "weights" / "best.pt"))
    assert _count(reloaded.model) == n
    assert reloaded.task == task


def test_cbam_checkpoint_loads_with_the_safe_loader(data, tmp_path):
    yolo = ucbam.patch_yolo(YOLO("yolov8n.yaml"), seed=0)
    yolo.train(data=str(data), project=str(tmp_path), name="run", **{**TRAIN, "val": False})
    model = load_model(tmp_path / "run" / "weights" / "last.pt")
    assert _count(model) == 6


def test_cli_patches_an_ultralytics_checkpoint_into_one_ultralytics_loads(tmp_path):
    from typer.testing import CliRunner

    from cbam_insert.cli import app

    plain = tmp_path / "yolov8n.pt"
    YOLO("yolov8n.yaml").save(str(plain))
    out = tmp_path / "yolov8n_cbam.pt"
    res = CliRunner().invoke(app, [str(plain), "-o", str(out), "--seed", "0", "--reduction", "8"])
    assert res.exit_code == 0, res.output
    assert "saved 6 CBAM module(s)" in res.stdout
    yolo = YOLO(str(out))
    assert _count(yolo.model) == 6 and yolo.model.cbam_yolo["sites"][0]["cbam"] == {"reduction": 8}
    x = torch.rand(1, 3, IMG, IMG)
    again = load_model(out)  # the safe loader reads it too
    assert torch.allclose(_out(again, x), _out(yolo.model, x), atol=1e-3)
    res = CliRunner().invoke(app, [str(out), "-o", str(tmp_path / "y.onnx"), "--json"])
    assert res.exit_code == 0, res.output


def test_remove_cbam_gives_back_the_plain_yolo_model():
    from cbam_insert import remove_cbam

    yolo = YOLO("yolov8n.yaml")
    before = yolo.model.state_dict()
    x = torch.rand(1, 3, IMG, IMG)
    plain = _features(yolo.model, x)
    ucbam.patch_yolo(yolo, seed=0)
    original = remove_cbam(yolo.model)
    assert _count(original) == 0 and _count(yolo.model) == 6
    assert list(original.state_dict()) == list(before)
    assert not any(isinstance(h, ucbam.CBAMHook) for m in original.modules() for h in m._forward_hooks.values())
    assert torch.equal(_features(original, x), plain)


@pytest.mark.parametrize(("cfg", "n"), [("yolo11n.yaml", 11), ("yolo26n.yaml", 13), ("yolov8n-pose.yaml", 6),
                                        ("yolov8n-obb.yaml", 6)])  # fmt: skip
def test_other_generations_and_heads_patch_fuse_and_copy(cfg, n):
    """Forward, fuse and deepcopy only (training is covered above for detect, segment, classify)."""
    import copy

    yolo = ucbam.patch_yolo(YOLO(cfg), seed=0)
    assert len(ucbam.cbam_modules(yolo.model)) == n
    x = torch.rand(1, 3, IMG, IMG)
    ref = _features(yolo.model, x)
    fused = copy.deepcopy(yolo.model).fuse(verbose=False)
    assert _count(fused) == n and _rel(_features(fused, x), ref) < 1e-3
