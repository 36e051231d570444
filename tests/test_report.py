"""Parameter and MAC accounting (hand-computed CBAM costs, torchvision's published metadata) and the
report's rendering."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn
from torch.overrides import TorchFunctionMode

from cbam_insert import CBAM, insert_cbam
from cbam_insert.report import (
    FLOP_NOTE,
    benchmark,
    cost_report,
    count_macs,
    count_params,
    render_bench,
    render_report,
    report_dict,
)


def cbam_macs(batch: int, channels: int, spatial: tuple[int, ...], *, hidden: int | None = None, reduction: int = 16,
              kernel: int = 7, pools: int = 2, channel: bool = True, spatial_gate: bool = True) -> int:  # fmt: skip
    """MACs FlopCounterMode sees in one CBAM forward, from the module's definition.

    Channel gate: ``pools`` pooled descriptors of C values per sample go through the shared MLP, a
    C x h and an h x C matrix product each: ``N * pools * 2 * C * h``. Spatial gate: a 2-in, 1-out
    convolution with a k^d kernel at every output position: ``N * 2 * k^d * prod(spatial)``. The
    sigmoid gates, pooling and the two broadcast products are elementwise: not counted.
    """
    h = hidden if hidden is not None else max(1, channels // reduction)
    positions = 1
    for s in spatial:
        positions *= s
    mlp = batch * pools * 2 * channels * h if channel else 0
    conv = batch * 2 * kernel ** len(spatial) * positions if spatial_gate else 0
    return mlp + conv


def cbam_params(channels: int, *, hidden: int | None = None, reduction: int = 16, kernel: int = 7, dims: int = 2) -> int:
    h = hidden if hidden is not None else max(1, channels // reduction)
    return 2 * channels * h + 2 * kernel**dims


class SmallNet(nn.Module):
    """conv-bn-relu units at three resolutions, 1-D, 2-D or 3-D."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, 24, 1), (24, 48, 2), (48, 96, 2)):
            layers += [conv(cin, cout, 3, stride=stride, padding=1, bias=False), bn(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(2).mean(-1))


def _check_against_hand_count(model: nn.Module, x: torch.Tensor, **opts) -> None:
    patched = insert_cbam(model, after="conv", example_inputs=(x,), **opts)
    report = patched.cbam_report
    cost = cost_report(model, patched, (x,), modules=report.modules)
    assert len(report.modules) == 3
    hand = {k: opts[k] for k in ("hidden", "reduction") if k in opts}
    pools = len(opts.get("pool_types", ("avg", "max")))
    total_macs = total_params = 0
    for site in report.used:
        params, macs = cost.per_module[site.module_name]
        want = cbam_macs(x.shape[0], site.channels, site.spatial, kernel=opts.get("kernel_size", 7), pools=pools,
                         channel=opts.get("channel", True), spatial_gate=opts.get("spatial", True), **hand)  # fmt: skip
        assert macs == want, (site.name, macs, want)
        total_macs += macs
        total_params += params
    assert cost.flops_after - cost.flops_before == total_macs
    assert cost.params_after - cost.params_before == total_params


def test_cbam_macs_equal_hand_count_after_conv_units_2d():
    model = SmallNet(2)
    _check_against_hand_count(model, torch.rand(2, 3, 32, 32))
    patched = insert_cbam(model, after="conv", example_inputs=(torch.rand(1, 3, 32, 32),))
    per = cost_report(model, patched, (torch.rand(1, 3, 32, 32),)).per_module
    assert [p for p, _ in per.values()] == [cbam_params(c) for c in (24, 48, 96)]


@pytest.mark.parametrize(
    "opts",
    [
        {"kernel_size": 3, "reduction": 4},
        {"hidden": 5},
        {"pool_types": ["avg", "max", "lp"]},
        {"pool_types": ["avg"]},
        {"channel": False},
        {"spatial": False},
        {"order": "parallel"},
        {"order": "spatial_first"},
        {"variant": "official"},
        {"init": "identity"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_cbam_macs_equal_hand_count_for_every_option(opts):
    _check_against_hand_count(SmallNet(2), torch.rand(1, 3, 16, 16), **opts)


@pytest.mark.parametrize("dims,shape", [(1, (1, 3, 64)), (3, (1, 3, 4, 16, 16))])
def test_cbam_macs_equal_hand_count_in_1d_and_3d(dims, shape):
    _check_against_hand_count(SmallNet(dims), torch.rand(*shape))


def test_resnet18_block_cbam_costs_by_hand():
    model = torchvision.models.resnet18()
    x = torch.rand(1, 3, 64, 64)
    patched = insert_cbam(model, after="block", example_inputs=(x,))
    cost = cost_report(model, patched, (x,), modules=patched.cbam_report.modules)
    # layer1..layer4 at 16, 8, 4, 2 px with 64..512 channels, two blocks each
    want = {
        f"layer{i}.{j}.cbam_add": (cbam_params(c), cbam_macs(1, c, (s, s)))
        for i, (c, s) in enumerate(((64, 16), (128, 8), (256, 4), (512, 2)), start=1)
        for j in (0, 1)
    }
    assert cost.per_module == want
    assert cost.per_module["layer1.0.cbam_add"] == (610, 1024 + 25088)
    assert cost.params_delta == sum(p for p, _ in want.values())
    assert cost.flops_delta == sum(m for _, m in want.values())


class Deep(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Nested(nn.Module):
    """``inner`` and ``outer.inner`` share a leaf name, and ``forward`` has data-dependent control
    flow, so only the submodules are traced (GraphModules inside an untraced root)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.inner = Deep(32)
        self.outer = nn.Module()
        self.outer.inner = Deep(32)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner(self.stem(x))
        if x.sum() > 0:
            x = x * 1.0
        return self.outer.inner(self.down(x))


def test_per_module_macs_use_exact_names_inside_partially_traced_models():
    model = Nested()
    x = torch.rand(1, 3, 32, 32)
    patched = insert_cbam(model, after="conv", example_inputs=(x,))
    assert type(patched) is Nested and patched.cbam_report.untraced
    names = sorted(patched.cbam_report.modules)
    assert len(names) == 2 and any(n.startswith("outer.") for n in names)
    cost = cost_report(model, patched, (x,), modules=names)
    by_size = {n: cost.per_module[n][1] for n in names}
    outer = next(n for n in names if n.startswith("outer."))
    inner = next(n for n in names if not n.startswith("outer."))
    assert by_size[inner] == cbam_macs(1, 32, (16, 16))
    assert by_size[outer] == cbam_macs(1, 32, (8, 8))


def test_attention_products_are_counted_on_cpu():
    """nn.MultiheadAttention: four D x D projections per token plus q @ k^T and attn @ v."""
    length, dim, heads = 50, 64, 4
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    macs, _ = count_macs(Wrap(), (torch.rand(1, length, dim),))
    assert macs == 4 * length * dim * dim + 2 * length * length * dim


def test_count_params_counts_shared_tensors_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, lin)
    assert count_params(model) == 20


def test_counting_on_meta_copy_equals_counting_real_tensors():
    model = torchvision.models.resnet18()
    x = torch.rand(1, 3, 96, 96)
    patched = insert_cbam(model, after="conv", example_inputs=(x,))
    for m in (model, patched):
        real = count_macs(m, (x,), on_meta=False)
        assert count_macs(m, (x,)) == real and real[0] > 0
    assert all(p.device.type == "cpu" for p in patched.parameters())  # the model itself is untouched
    meta = count_macs(model.to("meta"), (torch.empty(1, 3, 96, 96, device="meta"),))
    assert meta == count_macs(torchvision.models.resnet18(), (x,), on_meta=False)


def test_data_dependent_forward_is_counted_on_real_tensors():
    model = Nested()  # ``if x.sum() > 0`` cannot run on the meta device
    x = torch.rand(1, 3, 32, 32)
    assert count_macs(model, (x,)) == count_macs(model, (x,), on_meta=False)
    assert count_macs(model, (x,))[0] == 3 * 16 * 16 * 32 * 9 + 32 * 32 * 9 * (16 * 16 + 8 * 8 + 8 * 8)


# ----------------------------------------------------------------------------- torchvision metadata

CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)


class _EmptyOnMeta(TorchFunctionMode):
    """``torch.empty`` (how ``nn`` layers allocate parameters) makes meta tensors; so their
    initialisation costs nothing and other tensor maths still runs for real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _build_for_weights(name: str) -> tuple[nn.Module, torch.Tensor, dict]:
    """The architecture the first weights describe, on the meta device where it can be built there
    (only shapes matter for counting); input at the weights' crop size."""
    weights = next(iter(torchvision.models.get_model_weights(name)))
    meta = weights.meta
    kwargs: dict = {"weights": None, "num_classes": len(meta["categories"])}
    if name == "googlenet":
        kwargs["aux_logits"] = False  # the pretrained GoogLeNet drops its auxiliary heads
    if name.startswith("vit_"):
        kwargs["image_size"] = meta["min_size"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(name, **kwargs)
        except NotImplementedError:  # RegNet computes its widths with tensors: only its parameters go to meta
            with _EmptyOnMeta():
                model = torchvision.models.get_model(name, **kwargs).to("meta")
    crop = weights.transforms().crop_size
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    return model, torch.empty(1, 3, crop, crop, device="meta"), meta


def test_classification_zoo_is_complete():
    assert len(CLASSIFIERS) >= 80
    assert {"resnet50", "vit_h_14", "regnet_y_128gf", "googlenet", "inception_v3", "swin_v2_b"} <= set(CLASSIFIERS)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_unpatched_classifier_matches_torchvision_metadata(name):
    model, x, meta = _build_for_weights(name)
    macs, _ = count_macs(model, (x,))
    assert count_params(model) == meta["num_params"]
    assert round(macs / 1e9, 3) == meta["_ops"]


def test_resnet50_report_matches_metadata_on_real_tensors():
    meta = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta
    model = torchvision.models.resnet50()
    x = torch.rand(1, 3, 224, 224)
    patched = insert_cbam(model, after="block", example_inputs=(x,))
    cost = cost_report(model, patched, (x,))
    assert cost.params_before == meta["num_params"]
    assert round(cost.flops_before / 1e9, 3) == meta["_ops"]
    assert len(cost.per_module) == 16
    assert 0 < cost.flops_delta / cost.flops_before < 0.01


# ----------------------------------------------------------------------------- rendering and JSON


@pytest.fixture(scope="module")
def patched_resnet18():
    model = torchvision.models.resnet18()
    x = torch.rand(1, 3, 64, 64)
    patched = insert_cbam(model, after="block", example_inputs=(x,), max_sites=3)
    return model, patched, cost_report(model, patched, (x,), modules=patched.cbam_report.modules), x


def _text(renderables) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    for r in renderables:
        console.print(r)
    return console.export_text()


def test_render_report_shows_sites_totals_tree_and_what_is_counted(patched_resnet18):
    _, patched, cost, _ = patched_resnet18
    text = _text(render_report(patched.cbam_report, cost, model=patched, inputs="1x3x64x64"))
    table = text.split("Totals")[0]
    assert "layer1.0.add" in table and "layer2.0.add" in table and "layer2.1.add" not in table
    assert "3 used, 5 skipped" in text
    assert f"{cost.params_before:,}" in text and f"{cost.params_after:,}" in text
    assert f"+{cost.params_delta:,}" in text
    assert "610" in text and "26,112" in text  # layer1.0.cbam_add: params and MACs
    assert "BasicBlock" in text and "cbam_add (CBAM)" in text  # the tree
    assert FLOP_NOTE in " ".join(text.split())
    assert "--dry-run lists them" in text


def test_render_report_dry_run_lists_skipped_sites_with_reason(patched_resnet18):
    _, patched, cost, _ = patched_resnet18
    text = _text(render_report(patched.cbam_report, cost, show_skipped=True))
    assert text.count("skipped: beyond max_sites 3") == 5


def test_report_dict_is_json_with_integer_counts(patched_resnet18):
    _, patched, cost, _ = patched_resnet18
    data = json.loads(json.dumps(report_dict(patched.cbam_report, cost, output="out.pt")))
    assert data["output"] == "out.pt"
    for key in ("before", "after", "delta"):
        assert isinstance(data["params"][key], int) and isinstance(data["flops"][key], int)
    used = [s for s in data["sites"] if s["used"]]
    assert len(used) == 3 and len(data["sites"]) == 8
    assert sum(s["params"] for s in used) == data["params"]["delta"]
    assert sum(s["flops"] for s in used) == data["flops"]["delta"]
    assert all(s["params"] is None and s["reason"] for s in data["sites"] if not s["used"])
    assert data["modules"] == patched.cbam_report.modules
    assert data["sites"][0]["spatial"] == [16, 16] and data["sites"][0]["channels"] == 64


def test_benchmark_reports_medians_and_ratio(patched_resnet18):
    model, patched, _, x = patched_resnet18
    result = benchmark(model, patched, (x,), runs=3)
    assert result.runs == 3 and result.original > 0 and result.patched > 0
    assert result.ratio == pytest.approx(result.patched / result.original)
    assert model.training and patched.training  # modes restored
    assert "ratio" in _text([render_bench(result)])


def test_cbam_module_counts_match_module_alone():
    """The attribution inside a whole model equals counting the module by itself."""
    cbam = CBAM(64, reduction=8, kernel_size=3)
    alone, _ = count_macs(cbam, (torch.rand(2, 64, 10, 10),))
    assert alone == cbam_macs(2, 64, (10, 10), reduction=8, kernel=3)
