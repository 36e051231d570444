"""Ecosystem conformance: models from the libraries users patch, every placement, checked and tabulated.

The models come from timm (a fixed sample across families, ``drop_path_rate=0.1`` where the
family has it), Hugging Face transformers (vision CNNs built from small configs),
segmentation_models_pytorch (``encoder_weights=None``), MONAI (2-D and 3-D), efficientnet_pytorch
and ultralytics (YOLOv8 / YOLO11 detect, segment, classify from YAML). All have random weights
and nothing is downloaded. For each model and placement (``conv``, ``block``, ``stage``) this
patches with ``init="identity"`` and checks that:

* the sites used and skipped are listed, each skipped one with its reason;
* identity init reproduces the original's outputs in eval mode and in train mode (same seed, so
  dropout and stochastic depth draw the same), to 1e-4 relative to the output's scale;
* with the CBAM gates switched on, every CBAM is live in both modes: a forward hook counts
  exactly one call per forward, and backward from all outputs gives its parameters a gradient
  (non-zero in eval mode; in train mode stochastic depth may drop a branch for the whole batch);
* every original state-dict key is kept with an equal tensor, and the new keys are CBAM's;
* saved as ``pt`` and loaded back (``load_model``; with ``trust=True`` where the safe loader
  refuses the model's classes, which the table notes), the patched model gives equal outputs.

A row passes when every check holds, is a skip when the placement has no site (the reasons are
listed), and fails otherwise with the first failing check. Run::

    python tools/ecosystem.py                                  # everything, writes docs/ecosystem.md
    python tools/ecosystem.py --models 'timm:*' --placements block --output -
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from cbam_insert import CBAMInsertError, insert_cbam, load_model, save_model
from cbam_insert.modules import CBAM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import gates_on

PLACEMENTS = ("conv", "block", "stage")
TOLERANCE = 1e-4
COMMAND = "python tools/ecosystem.py"
DOC = Path(__file__).resolve().parents[1] / "docs" / "ecosystem.md"


@dataclass(frozen=True)
class Entry:
    """One model: ``library:name``, how to build it, and its input (2-D 64x64 or 3-D 32^3, batch 2)."""

    id: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...] = (2, 3, 64, 64)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        try:
            return timm.create_model(name, pretrained=False, num_classes=10, drop_path_rate=0.1, **kw)
        except TypeError:  # a family without stochastic depth
            return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return build


def _hf(config: str, model: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(num_labels=10, **kw))

    return build


def _smp(arch: str, encoder: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2)

    return build


def _monai(name: str, dims: int, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from monai.networks import nets

        if name == "UNet":
            return nets.UNet(dims, 1, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2)
        if name == "BasicUNet":
            return nets.BasicUNet(spatial_dims=dims, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8))
        if name == "SegResNet":
            return nets.SegResNet(spatial_dims=dims, in_channels=1, out_channels=2, init_filters=8)
        return nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2)

    return build


def _effnet_pytorch() -> nn.Module:
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=64)


def _yolo(cfg: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ultralytics.nn.tasks import ClassificationModel, DetectionModel, SegmentationModel

        cls = ClassificationModel if "-cls" in cfg else SegmentationModel if "-seg" in cfg else DetectionModel
        return cls(cfg, verbose=False)

    return build


_SMALL_HF = {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128]}

ENTRIES: tuple[Entry, ...] = (
    *(
        Entry(f"timm:{n}", _timm(n))
        for n in (
            "resnet18", "resnet50d", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002",
            "rexnet_100", "dla34", "hrnet_w18_small", "densenet121", "cspresnet50", "mixnet_s",
        )
    ),
    Entry("transformers:ResNet", _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=16, **_SMALL_HF)),
    Entry("transformers:ConvNeXt", _hf("ConvNextConfig", "ConvNextForImageClassification", **_SMALL_HF)),
    Entry("transformers:RegNet", _hf("RegNetConfig", "RegNetForImageClassification", embedding_size=16, groups_width=8, **_SMALL_HF)),
    Entry("transformers:MobileNetV2", _hf("MobileNetV2Config", "MobileNetV2ForImageClassification", image_size=64)),
    Entry("transformers:EfficientNet", _hf("EfficientNetConfig", "EfficientNetForImageClassification", image_size=64, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280)),
    *(Entry(f"smp:{a}/{e}", _smp(a, e), (2, 3, 128, 128) if a == "PAN" else (2, 3, 64, 64)) for a, e in (
        ("Unet", "resnet18"), ("Unet", "efficientnet-b0"), ("FPN", "resnet18"), ("FPN", "efficientnet-b0"),
        ("DeepLabV3Plus", "resnet18"), ("DeepLabV3Plus", "efficientnet-b0"), ("Linknet", "resnet18"),
        ("PSPNet", "resnet18"), ("UnetPlusPlus", "resnet18"), ("PAN", "resnet18"),
    )),
    *(
        Entry(f"monai:{n}-{d}d", _monai(n, d), (2, 1, 64, 64) if d == 2 else (2, 1, 32, 32, 32))
        for n in ("UNet", "BasicUNet", "SegResNet", "DenseNet121")
        for d in (2, 3)
    ),
    Entry("efficientnet_pytorch:efficientnet-b0", _effnet_pytorch),
    *(Entry(f"ultralytics:{c}", _yolo(f"{c}.yaml")) for c in ("yolov8n", "yolov8n-seg", "yolov8n-cls", "yolo11n", "yolo11n-seg", "yolo11n-cls")),
)


@dataclass
class Row:
    model: str
    placement: str
    status: str = "fail"  # pass | skip | fail
    used: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the skip reasons, counted
    untraced: int = 0
    trust: bool = False  # the .pt round trip needed trust=True
    half: bool = False  # the .pt file holds float16 weights (an Ultralytics checkpoint)
    detail: str = ""
    seconds: float = 0.0


# ----------------------------------------------------------------------------- checks


def _leaves(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _leaves(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _leaves(v)
    elif hasattr(out, "to_tuple"):  # a transformers ModelOutput
        yield from _leaves(out.to_tuple())


def _floats(out: Any) -> list[torch.Tensor]:
    return [t for t in _leaves(out) if t.is_floating_point()]


def _run(model: nn.Module, x: torch.Tensor, train: bool, grad: bool = False) -> Any:
    model.train(train)
    torch.manual_seed(0)
    with torch.enable_grad() if grad else torch.no_grad():
        return model(x)


def _differ(ref: Any, got: Any) -> str | None:
    a, b = _floats(ref), _floats(got)
    if len(a) != len(b):
        return f"{len(b)} output tensors, original {len(a)}"
    for i, (r, g) in enumerate(zip(a, b)):
        if r.shape != g.shape:
            return f"output {i} shape {list(g.shape)}, original {list(r.shape)}"
        scale = max(float(r.abs().max()), 1.0) if r.numel() else 1.0
        err = float((r - g).abs().max()) if r.numel() else 0.0
        if not err <= TOLERANCE * scale:
            return f"output {i} differs by {err:.2e} (scale {scale:.2e})"
    return None


def randomize(model: nn.Module) -> nn.Module:
    """Random norm scales (zero-initialised last norms would hide a dead CBAM behind zero gradients)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return model


def liveness(model: nn.Module, x: torch.Tensor, train: bool) -> str | None:
    """None when each CBAM is called once per forward and backward reaches its parameters."""
    work = copy.deepcopy(model)
    calls: Counter[str] = Counter()
    mods = {n: m for n, m in work.named_modules() if isinstance(m, CBAM)}
    for name, mod in mods.items():
        mod.register_forward_hook(lambda m, i, o, name=name: calls.update([name]))
    for p in work.parameters():
        p.grad = None
    outs = _floats(_run(work, x, train, grad=True))
    sum(o.float().sum() for o in outs if o.requires_grad).backward()
    wrong = {n: calls[n] for n in mods if calls[n] != 1}
    if wrong:
        return f"{len(wrong)} CBAM(s) not called exactly once ({', '.join(f'{n}: {c}' for n, c in list(wrong.items())[:3])})"
    no_grad = [n for n, m in mods.items() if any(p.grad is None for p in m.parameters())]
    if not no_grad and not train:
        no_grad = [n for n, m in mods.items() if not any(bool(p.grad.any()) for p in m.parameters())]
    if no_grad:
        return f"{len(no_grad)} CBAM(s) get no gradient ({', '.join(no_grad[:3])})"
    return None


def _keys(original: nn.Module, patched: nn.Module) -> str | None:
    before, after = original.state_dict(), patched.state_dict()
    missing = [k for k in before if k not in after]
    if missing:
        return f"{len(missing)} original key(s) lost, e.g. {missing[0]}"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    if changed:
        return f"original tensor changed: {changed[0]}"
    foreign = [k for k in after if k not in before and "cbam" not in k]
    return f"new key(s) that are not CBAM's: {foreign[0]}" if foreign else None


def _pt_roundtrip(patched: nn.Module, x: torch.Tensor, row: Row) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_model(patched, path, format="pt")
        try:
            loaded = load_model(path)
        except CBAMInsertError:
            loaded, row.trust = load_model(path, trust=True), True
    ref = patched
    saved, got = patched.state_dict(), loaded.state_dict()
    if set(saved) == set(got) and any(not torch.equal(saved[k], got[k]) for k in saved):
        if not all(torch.equal(v.half().to(v.dtype) if v.is_floating_point() else v, got[k]) for k, v in saved.items()):
            return ".pt round trip: the loaded weights differ"
        ref, row.half = copy.deepcopy(patched), True  # stored as float16: compare with those weights
        ref.load_state_dict(got)
    why = _differ(_run(ref, x, False), _run(loaded, x, False))
    return f".pt round trip: {why}" if why else None


def _count(reasons: Sequence[str]) -> list[str]:
    return [f"{n}x {r}" for r, n in Counter(reasons).most_common()]


def check(entry: Entry, placement: str, original: nn.Module) -> Row:
    row = Row(entry.id, placement)
    x = torch.rand(*entry.shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    try:
        try:
            patched = insert_cbam(original, after=placement, example_inputs=(x,), init="identity")
        except CBAMInsertError as exc:
            if not str(exc).startswith("no site"):
                raise
            row.status, row.detail = "skip", str(exc)
            return row
        report = patched.cbam_report
        row.used = len(report.used)
        row.skipped = len(report.sites) - row.used
        row.reasons = _count([s.reason for s in report.sites if not s.used])
        row.untraced = len(report.untraced)
        for train in (False, True):
            why = _differ(_run(original, x, train), _run(patched, x, train))
            if why:
                row.detail = f"identity ({'train' if train else 'eval'}): {why}"
                return row
        why = _keys(original, patched)
        if why:
            row.detail = f"keys: {why}"
            return row
        gates_on(patched)
        for train in (False, True):
            why = liveness(patched, x, train)
            if why:
                row.detail = f"{'train' if train else 'eval'}: {why}"
                return row
        why = _pt_roundtrip(patched, x, row)
        if why:
            row.detail = why
            return row
        row.status = "pass"
    except Exception as exc:  # noqa: BLE001 - any error is this row's failure
        row.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if os.environ.get("ECOSYSTEM_TRACEBACK"):
            traceback.print_exc()
    finally:
        row.seconds = time.perf_counter() - start
    return row


def run_entry(entry: Entry, placements: Sequence[str] = PLACEMENTS) -> list[Row]:
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            original = randomize(entry.build()).eval()
    except Exception as exc:  # noqa: BLE001
        return [Row(entry.id, p, "fail", detail=f"build: {type(exc).__name__}: {exc}") for p in placements]
    rows = []
    for p in placements:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(check(entry, p, original))
    return rows


# ----------------------------------------------------------------------------- table


def _machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU, torch {torch.__version__.split('+')[0]}, {_versions()}"


def _versions() -> str:
    out = []
    for mod in ("timm", "transformers", "segmentation_models_pytorch", "monai", "efficientnet_pytorch", "ultralytics"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            out.append(f"{mod} missing")
    return ", ".join(out)


def render_markdown(rows: Sequence[Row], command: str, seconds: float) -> str:
    counts = Counter(r.status for r in rows)
    models = len({r.model for r in rows})
    lines = [
        "# Ecosystem conformance",
        "",
        (
            f"{models} models from timm, transformers, segmentation_models_pytorch, MONAI, efficientnet_pytorch and "
            f"ultralytics x {len({r.placement for r in rows})} placements: **{counts['pass']} pass, "
            f"{counts['skip']} skip (no site, reasons listed), {counts['fail']} fail**."
        ),
        "",
        (
            "Each row patches the model (random weights, built from its config; nothing downloaded) with "
            "`init=\"identity\"` and checks: identity exact in eval and train mode (same seed), every CBAM called "
            "once per forward and reached by backward in both modes (gates switched on), original state-dict keys "
            "kept, and the `.pt` round trip equal. See `tools/ecosystem.py` for the details."
        ),
        "",
        f"Command: `{command}`. Machine: {_machine()}. Full run: {seconds / 60:.1f} min.",
        "",
        (
            "How these models are patched. A model whose whole forward traces becomes an `fx.GraphModule` "
            "(one graph per training mode). Otherwise (ultralytics, smp's FPN/DeepLabV3+, transformers' "
            "output dataclasses...) the largest submodules that trace are patched and everything else is left "
            "as it is: a patched submodule stays the same object of the same class (properties, methods and "
            "attributes intact, through `deepcopy` and pickling); its forward becomes the rewritten code, which "
            "calls the host's own child modules wherever nothing inside them changed, and a CBAM on the "
            "submodule's own output is a forward hook, so host edits such as ultralytics `fuse()` keep working "
            "and keep CBAM. A child whose forward does not trace (transformers' `MobileNetV2ConvLayer` computes "
            "padding with `int()`) is kept whole as an opaque layer and the rest still gets sites; the "
            "*untraced parts* column counts what the dry run lists with the reason. Every site is found again "
            "in the train-mode graph by what defines it (module call, or op and shape within its module), "
            "so stochastic depth and dropout written in Python never detach a CBAM in training."
        ),
        "",
        "| model | placement | status | sites used | skipped | untraced parts | skip reasons / detail |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        what = "; ".join(r.reasons[:4]) + (f"; ... ({len(r.reasons) - 4} more)" if len(r.reasons) > 4 else "")
        detail = r.detail if r.status != "pass" else what
        if r.trust:
            detail = (detail + "; " if detail else "") + ".pt loaded with trust=True"
        if r.half:
            detail = (detail + "; " if detail else "") + ".pt holds float16 weights (an Ultralytics checkpoint)"
        detail = detail.replace("|", "\\|")
        lines.append(f"| `{r.model}` | {r.placement} | {r.status} | {r.used} | {r.skipped} | {r.untraced} | {detail} |")
    return "\n".join(lines) + "\n"


def select(patterns: Sequence[str] | None) -> list[Entry]:
    if not patterns:
        return list(ENTRIES)
    return [e for e in ENTRIES if any(fnmatch.fnmatchcase(e.id, p) for p in patterns)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated globs over library:name (default: all)")
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    ap.add_argument("--output", default=str(DOC), help="markdown file, or - for stdout")
    ap.add_argument("--json", help="also write the rows as JSON here (with the run's time)")
    ap.add_argument("--render", help="only write the table of a JSON file a run wrote")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        rows = [Row(**r) for r in data["rows"]]
        _write(render_markdown(rows, data["command"], data["seconds"]), args.output)
        return 0
    torch.set_num_threads(max(1, int(os.environ.get("ECOSYSTEM_THREADS", "1"))))
    entries = select(args.models.split(",") if args.models else None)
    placements = [p for p in args.placements.split(",") if p]
    command = " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    rows: list[Row] = []
    for entry in entries:
        got = run_entry(entry, placements)
        rows.extend(got)
        for r in got:
            print(f"{r.model:40s} {r.placement:6s} {r.status:4s} {r.used:3d} used {r.seconds:6.1f}s {r.detail[:100]}", file=sys.stderr, flush=True)
        if args.json:
            data = {"command": command, "seconds": time.perf_counter() - start, "rows": [asdict(r) for r in rows]}
            Path(args.json).write_text(json.dumps(data, indent=1))
    _write(render_markdown(rows, command, time.perf_counter() - start), args.output)
    return 0 if all(r.status != "fail" for r in rows) else 1


def _write(text: str, output: str) -> None:
    if output == "-":
        sys.stdout.write(text)
    else:
        Path(output).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
