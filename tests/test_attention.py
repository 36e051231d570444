"""The attention modules other than CBAM: each against a reference written here from its paper's
equations (with the module's weights copied in), float64 gradients, parameter counts from the
papers' formulas, the identity gate, the option declarations, and exports in their runtimes."""

from __future__ import annotations

import json
import math
import warnings

import _user_attention
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cbam_insert import CBAMInsertError, apply_recipe, find_sites, insert_attention, insert_cbam, load_model, save_model
from cbam_insert.attention import (
    ATTENTION,
    BAM,
    ECA,
    GAM,
    SE,
    CoordAttention,
    SimAM,
    TripletAttention,
    config_of,
    eca_kernel_size,
    rank_refusal,
)
from cbam_insert.options import declared
from cbam_insert.report import cost_report

NEW = ["se", "eca", "coord", "simam", "bam", "gam", "triplet"]


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, random batch-norm statistics, so no term hides behind a default."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m


def _bn(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Eval-mode batch norm written out: (x - mean) / sqrt(var + eps) * w + b over axis 1."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


# ----------------------------------------------------------------------------- references from the papers


def ref_se(m: SE, x: torch.Tensor) -> torch.Tensor:
    z = x.flatten(2).mean(-1)  # eq. 2: squeeze
    s = torch.sigmoid(
        m.fc2.weight @ torch.relu(m.fc1.weight @ z.T + m.fc1.bias[:, None]) + m.fc2.bias[:, None]
    )  # eq. 3
    return x * s.T.reshape(*s.T.shape, *[1] * (x.dim() - 2))  # eq. 4


def ref_eca(m: ECA, x: torch.Tensor) -> torch.Tensor:
    y = x.flatten(2).mean(-1)  # (N, C)
    w = m.conv.weight.flatten()
    k = w.numel()
    pad = (k - 1) // 2
    yp = F.pad(y, (pad, pad))
    out = torch.zeros_like(y)
    for c in range(y.shape[1]):  # eq. 9: w_c = sigmoid(sum_j w^j y_c^j) over the k neighbours of channel c
        out[:, c] = (yp[:, c : c + k] * w).sum(-1)
    return x * torch.sigmoid(out).reshape(*y.shape, *[1] * (x.dim() - 2))


def ref_coord(m: CoordAttention, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 2-7 for a 2-D map, with the authors' (N, C, H + W, 1) layout and 2-D 1x1 convolutions."""
    h = x.shape[2]
    zh = x.mean(3, keepdim=True)  # (N, C, H, 1)
    zw = x.mean(2, keepdim=True).permute(0, 1, 3, 2)  # (N, C, W, 1)
    f = F.conv2d(torch.cat([zh, zw], 2), m.conv1.weight[..., None], m.conv1.bias)
    f = _bn(f, m.bn1)
    f = f * F.relu6(f + 3) / 6  # h-swish
    fh, fw = f[:, :, :h], f[:, :, h:].permute(0, 1, 3, 2)
    conv_h, conv_w = m.axis_convs
    gh = torch.sigmoid(F.conv2d(fh, conv_h.weight[..., None], conv_h.bias))  # (N, C, H, 1)
    gw = torch.sigmoid(F.conv2d(fw, conv_w.weight[..., None], conv_w.bias))  # (N, C, 1, W)
    return x * gh * gw


def ref_simam(m: SimAM, x: torch.Tensor) -> torch.Tensor:
    lam = m.e_lambda
    flat = x.flatten(2)
    mu = flat.mean(-1, keepdim=True)
    sigma2 = ((flat - mu) ** 2).sum(-1, keepdim=True) / (flat.shape[-1] - 1)
    e = 4 * (sigma2 + lam) / ((flat - mu) ** 2 + 2 * sigma2 + 2 * lam)  # eq. 5: the minimal energy
    return x * torch.sigmoid(1 / e).view_as(x)  # eq. 6


def ref_bam(m: BAM, x: torch.Tensor) -> torch.Tensor:
    avg = x.flatten(2).mean(-1)
    mlp = F.linear(
        torch.relu(F.linear(avg, m.channel_fc0.weight, m.channel_fc0.bias)), m.channel_fc1.weight, m.channel_fc1.bias
    )
    mc = _bn(mlp, m.channel_bn)[:, :, None, None]  # eq. 3
    c0, b0, _, c1, b1, _, c2, b2, _, c3, b3 = m.spatial
    s = torch.relu(_bn(F.conv2d(x, c0.weight, c0.bias), b0))
    s = torch.relu(_bn(F.conv2d(s, c1.weight, c1.bias, padding=4, dilation=4), b1))
    s = torch.relu(_bn(F.conv2d(s, c2.weight, c2.bias, padding=4, dilation=4), b2))
    ms = _bn(F.conv2d(s, c3.weight, c3.bias), b3)  # eq. 4: (N, 1, H, W)
    return x + x * torch.sigmoid(mc + ms)  # eqs. 1-2


def ref_gam(m: GAM, x: torch.Tensor) -> torch.Tensor:
    """Fig. 2 as drawn: permute to (N, H, W, C), MLP, permute back, sigmoid; then two 7x7 convs."""
    w1, w2 = m.channel_fc1.weight[:, :, 0, 0], m.channel_fc2.weight[:, :, 0, 0]
    p = x.permute(0, 2, 3, 1)
    mc = F.linear(torch.relu(F.linear(p, w1, m.channel_fc1.bias)), w2, m.channel_fc2.bias).permute(0, 3, 1, 2)
    f2 = torch.sigmoid(mc) * x
    c1, n1, _, c2, n2 = m.spatial
    s = torch.relu(_bn(F.conv2d(f2, c1.weight, c1.bias, padding=3), n1))
    ms = torch.sigmoid(_bn(F.conv2d(s, c2.weight, c2.bias, padding=3), n2))
    return ms * f2


def ref_triplet(m: TripletAttention, x: torch.Tensor) -> torch.Tensor:
    def gate(t: torch.Tensor, g: nn.Module) -> torch.Tensor:
        z = torch.cat([t.max(1, keepdim=True).values, t.mean(1, keepdim=True)], 1)  # Z-pool, eq. 1
        return t * torch.sigmoid(_bn(F.conv2d(z, g.conv.weight, padding=3), g.bn))

    g1, g2, g3 = m.gates
    y1 = gate(x.permute(0, 2, 1, 3), g1).permute(0, 2, 1, 3)  # (C, W) interaction, pooled over H
    y2 = gate(x.permute(0, 3, 2, 1), g2).permute(0, 3, 2, 1)  # (H, C) interaction, pooled over W
    y3 = gate(x, g3)  # (H, W), pooled over C
    return (y1 + y2 + y3) / 3  # eq. 2


REFS = {"se": ref_se, "eca": ref_eca, "coord": ref_coord, "simam": ref_simam, "bam": ref_bam, "gam": ref_gam,
        "triplet": ref_triplet}  # fmt: skip


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("channels", [8, 48])
def test_module_matches_the_papers_equations(name, channels):
    m = _randomise(ATTENTION[name](channels)).eval()
    x = torch.randn(3, channels, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(m(x), REFS[name](m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["se", "eca", "simam"])
@pytest.mark.parametrize("dims", [1, 3])
def test_channel_and_parameter_free_modules_extend_to_1d_and_3d(name, dims):
    """The definitions pool over every spatial axis, so the same reference holds at any rank."""
    m = _randomise(ATTENTION[name](16, dims=dims)).eval()
    x = torch.randn(2, 16, *([5] * dims))
    with torch.no_grad():
        torch.testing.assert_close(m(x), REFS[name](m, x), atol=1e-5, rtol=1e-5)


def test_coord_3d_gates_each_axis_from_the_other_two():
    m = _randomise(CoordAttention(16, dims=3)).eval()
    x = torch.randn(2, 16, 3, 4, 5)
    pooled = [x.mean((3, 4)), x.mean((2, 4)), x.mean((2, 3))]
    f = torch.cat(pooled, 2)
    f = _bn(F.conv1d(f, m.conv1.weight, m.conv1.bias), m.bn1)
    f = f * F.relu6(f + 3) / 6
    parts = torch.split(f, [3, 4, 5], 2)
    want = x
    for i, (conv, part) in enumerate(zip(m.axis_convs, parts)):
        g = torch.sigmoid(F.conv1d(part, conv.weight, conv.bias))
        shape = [2, 16, 1, 1, 1]
        shape[2 + i] = part.shape[-1]
        want = want * g.view(shape)
    with torch.no_grad():
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


def test_triplet_3d_has_one_branch_per_axis():
    m = _randomise(TripletAttention(6, dims=3)).eval()
    assert len(m.gates) == 4
    x = torch.randn(2, 6, 4, 5, 3)

    def gate(t, g):
        z = torch.cat([t.amax(1, keepdim=True), t.mean(1, keepdim=True)], 1)
        return t * torch.sigmoid(_bn(F.conv3d(z, g.conv.weight, padding=3), g.bn))

    ys = [gate(x.transpose(1, a), g).transpose(1, a) for a, g in zip((2, 3, 4), m.gates)]
    want = (sum(ys) + gate(x, m.gates[3])) / 4
    with torch.no_grad():
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


def test_simam_on_a_single_position_gives_half():
    m = SimAM(4)
    x = torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(m(x), x * torch.sigmoid(torch.tensor(0.5)))


# ----------------------------------------------------------------------------- parameter counts


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("c", [64, 256, 2048])
def test_parameter_counts_follow_the_papers_formulas(c):
    h16, h4, mip = c // 16, c // 4, max(8, c // 32)
    assert _params(SE(c)) == 2 * c * h16 + h16 + c  # two FC layers with biases
    assert _params(ECA(c)) == eca_kernel_size(c)  # k weights, no bias
    assert _params(CoordAttention(c)) == c * mip + mip + 2 * mip + 2 * (mip * c + c)
    assert _params(SimAM(c)) == 0
    channel = c * h16 + h16 + h16 * c + c + 2 * c
    spatial = (c * h16 + h16 + 2 * h16) + 2 * (9 * h16 * h16 + h16 + 2 * h16) + (h16 + 1 + 2)
    assert _params(BAM(c)) == channel + spatial
    assert _params(GAM(c)) == (2 * c * h4 + h4 + c) + (2 * 49 * c * h4 + h4 + c + 2 * h4 + 2 * c)
    assert _params(TripletAttention(c)) == 3 * (2 * 49 + 2)  # 300: the paper's 4.8K over ResNet-50's 16 blocks
    g = 4
    assert _params(GAM(c, groups=g)) == (2 * c * h4 + h4 + c) + (2 * 49 * c * h4 // g + h4 + c + 2 * h4 + 2 * c)


# ----------------------------------------------------------------------------- GAM with grouped convolutions


def ref_gam_grouped(m: GAM, x: torch.Tensor, g: int) -> torch.Tensor:
    """The grouped variant written out: group g of a convolution sees input group g only; the
    shuffle sends hidden channel j*(C'/g) + i to position i*g + j (ShuffleNet's)."""
    w1, w2 = m.channel_fc1.weight[:, :, 0, 0], m.channel_fc2.weight[:, :, 0, 0]
    p = x.permute(0, 2, 3, 1)
    f2 = torch.sigmoid(F.linear(torch.relu(F.linear(p, w1, m.channel_fc1.bias)), w2, m.channel_fc2.bias)).permute(
        0, 3, 1, 2
    ) * x
    c1, n1, _, c2, n2 = m.spatial

    def grouped(t: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        ins, outs = t.chunk(g, 1), conv.weight.chunk(g, 0)
        bias = conv.bias.chunk(g, 0)
        return torch.cat([F.conv2d(a, w, b, padding=3) for a, w, b in zip(ins, outs, bias)], 1)

    h = torch.relu(_bn(grouped(f2, c1), n1))
    per = h.shape[1] // g
    order = [j * per + i for i in range(per) for j in range(g)]
    h = h[:, order]
    return torch.sigmoid(_bn(grouped(h, c2), n2)) * f2


@pytest.mark.parametrize(("channels", "g"), [(32, 2), (64, 4), (48, 3)])
def test_gam_groups_match_grouped_convolutions_with_a_channel_shuffle(channels, g):
    m = _randomise(GAM(channels, groups=g)).eval()
    x = torch.randn(2, channels, 9, 7)
    torch.testing.assert_close(m(x), ref_gam_grouped(m, x, g), atol=1e-5, rtol=1e-5)
    plain = _randomise(GAM(channels)).eval()
    assert m.spatial[0].weight.shape[1] == channels // g and plain.spatial[0].weight.shape[1] == channels


def test_gam_groups_that_do_not_divide_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^gam --groups 3 must divide the channels \(64\) and the hidden width C // r \(16\)$"):
        GAM(64, groups=3)


def test_gam_groups_skip_the_sites_they_do_not_divide():
    # ResNet-18's blocks have 64..512 channels: groups=32 divides C but not C/4 = 16 at layer1
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    patched = insert_attention(model, module="gam", groups=32, after="block", example_inputs=(x,))
    sites = {s.name: s for s in patched.cbam_report.sites if s.kind == "block"}
    skipped = [s for s in sites.values() if not s.used]
    assert skipped and all("gam --groups 32 must divide" in s.reason for s in skipped)
    used = [s for s in sites.values() if s.used]
    assert used and all(s.shape[1] // 4 % 32 == 0 for s in used)
    torch.testing.assert_close(patched(x).shape, model(x).shape)
    gams = [mod for mod in patched.modules() if isinstance(mod, GAM)]
    assert len(gams) == len(used) and all(mod.groups == 32 for mod in gams)


@pytest.mark.parametrize(("c", "k"), [(16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel(c, k):
    """k = |log2(C)/2 + 1/2|_odd: the integer part, made odd upwards (the authors' rounding)."""
    assert ECA(c).kernel_size == k
    assert ECA(c, kernel_size=9).kernel_size == 9
    t = int(math.log2(c))
    assert ECA(c, k_gamma=1.0, k_b=0.0).kernel_size == (t if t % 2 else t + 1)


def test_small_channel_counts_keep_a_hidden_layer():
    assert SE(4).fc1.out_features == 1
    assert CoordAttention(16).conv1.out_channels == 8  # max(8, C // 32)
    assert GAM(2).channel_fc1.out_channels == 1


# ----------------------------------------------------------------------------- gradients, identity, ranks


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("training", [False, True])
def test_gradcheck_float64_input_and_parameters(name, training):
    m = _randomise(ATTENTION[name](8)).double().train(training)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    x = torch.randn(3, 8, 5, 4, dtype=torch.double, requires_grad=True)
    buffers = {n: b.clone() for n, b in m.named_buffers()}

    def f(x, *ps):
        state = dict(zip(names, ps)) | {n: b.clone() for n, b in buffers.items()}  # BN updates stay local
        return torch.func.functional_call(m, state, (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_identity_init_is_exact_in_train_and_eval_and_learns(name):
    m = _randomise(ATTENTION[name](16, init="identity"))
    with torch.no_grad():
        m.gamma.zero_()
    x = torch.randn(4, 16, 6, 6, requires_grad=True)
    for mode in (True, False):
        assert torch.equal(m.train(mode)(x), x)
    m.train()
    (m(x) * torch.randn_like(x)).sum().backward()
    assert m.gamma.grad is not None and m.gamma.grad.abs().item() > 0
    assert _params(m) == _params(ATTENTION[name](16)) + 1


@pytest.mark.parametrize("name", NEW)
def test_a_rank_the_definition_does_not_cover_is_refused_with_the_reason(name):
    for dims in (0, 4, True):
        with pytest.raises(ValueError, match=f"^{name} handles"):
            ATTENTION[name](8, dims=dims)
    assert rank_refusal(name, 2) is None


def test_coordinate_attention_refuses_1d_maps_saying_why():
    with pytest.raises(ValueError, match="a 1-D map has only one axis"):
        CoordAttention(8, dims=1)
    assert "only one axis" in rank_refusal("coord", 1)


@pytest.mark.parametrize("name", NEW)
def test_wrong_input_is_one_line_naming_the_shape(name):
    m = ATTENTION[name](8)
    with pytest.raises(ValueError, match=rf"^{name} expects input of shape \(N, 8, \*, \*\), got \[2, 4, 5, 5\]$"):
        m(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("shape", [(2, 8, 5, 5), (2, 8, 1, 1)], ids=["5x5", "1x1"])
def test_constant_map_gives_finite_output_and_gradients(name, shape):
    # a dead (all-zero) channel or a single position: no 0/0 in a variance, a norm or its gradient
    m = _randomise(ATTENTION[name](8, init="identity")).eval()
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.zeros(shape)
    x[0, 1:] = torch.randn(shape[1] - 1, *shape[2:])
    x.requires_grad_()
    y = m(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", NEW)
def test_empty_batch_and_half_precision(name):
    m = ATTENTION[name](8).eval()
    assert m(torch.zeros(0, 8, 5, 5)).shape == (0, 8, 5, 5)
    x = torch.randn(2, 8, 5, 5)
    got = m.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(got, m.float()(x), atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------- the declarations


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_every_option_is_declared_once_with_type_default_and_help(name):
    opts = declared(config_of(name))
    assert opts[0].name == "init"
    for o in opts:
        assert o.help and o.type in (int, float, str, bool, tuple)
        assert config_of(name)().__getattribute__(o.name) == o.default


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("se", {"reduction": 0}, "reduction must be a positive integer, got 0"),
        ("se", {"reduction": 2.5}, "reduction must be an integer, got 2.5"),
        ("se", {"kernel_size": 3}, "unknown se option(s) kernel_size; valid: init, reduction"),
        ("eca", {"kernel_size": 4}, "kernel_size must be an odd integer >= 1, got 4"),
        ("coord", {"init": "zeros"}, "init must be one of default, identity, got 'zeros'"),
        ("simam", {"e_lambda": -1.0}, "e_lambda must be a positive number, got -1.0"),
        ("bam", {"dilation": True}, "dilation must be an integer, got True"),
        ("gam", {"kernel_size": 6}, "kernel_size must be an odd integer >= 1, got 6"),
        ("triplet", {"kernel_size": "7"}, "kernel_size must be an integer, got '7'"),
    ],
)
def test_bad_options_raise_at_construction_in_one_line(name, options, message):
    with pytest.raises(ValueError) as info:
        ATTENTION[name](16, **options)
    assert str(info.value) == message


def test_the_recipe_form_of_a_config_holds_only_what_differs_from_the_default():
    assert config_of("se")(reduction=8).given() == {"reduction": 8}
    assert config_of("cbam")(pool_types=["avg", "lp"]).given() == {"pool_types": ["avg", "lp"]}
    assert config_of("simam")().given() == {}


# ----------------------------------------------------------------------------- exports in their runtimes


EXPORTED = [pytest.param(n, {}, id=n) for n in NEW] + [pytest.param("gam", {"groups": 2}, id="gam-groups2")]


@pytest.mark.parametrize(("name", "opts"), EXPORTED)
def test_torchscript_script_and_trace_match_eager(name, opts):
    m = _randomise(ATTENTION[name](8, init="identity", **opts)).eval()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    x = torch.randn(2, 8, 6, 5)
    want = m(x)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no size is turned into a Python value
        traced = torch.jit.trace(m, (x,))
    torch.testing.assert_close(traced(x), want)


@pytest.mark.parametrize(("name", "opts"), EXPORTED)
def test_torch_export_matches_eager(name, opts):
    m = _randomise(ATTENTION[name](8, **opts)).eval()
    x = torch.randn(2, 8, 6, 5)
    ep = torch.export.export(m, (x,))
    y = torch.randn(2, 8, 6, 5)
    torch.testing.assert_close(ep.module()(y), m(y))


@pytest.mark.parametrize(("name", "opts"), EXPORTED)
def test_onnx_export_runs_in_onnxruntime(name, opts, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = _randomise(ATTENTION[name](8, **opts)).eval()
    x = torch.randn(2, 8, 6, 5)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(m, (x,), str(path), opset_version=18, dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), m(x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- insertion, recipes, files


def _perturb(model: nn.Module, names: list[str]) -> None:
    """Open the identity gates (gamma = 1) and jitter every other weight by up to ~50 % of itself,
    so the modules change the output without saturating their sigmoids."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in names:
            for pname, p in model.get_submodule(n).named_parameters():
                if pname == "gamma":
                    p.fill_(1.0)
                else:
                    p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))


def _check_insertion(build, module: str, x: torch.Tensor, after: str = "block", expect: int | None = None) -> nn.Module:
    model = build().eval()
    patched = insert_attention(model, after=after, example_inputs=(x,), module=module, init="identity", seed=0)
    names = patched.cbam_report.modules
    assert names and all(type(patched.get_submodule(n)) is ATTENTION[module] for n in names)
    assert all(n.rpartition(".")[2].startswith(module + "_") for n in names)
    if expect is not None:
        assert len(names) == expect
    with torch.no_grad():
        torch.testing.assert_close(patched.eval()(x), model(x), atol=1e-5, rtol=0)  # identity init
        _perturb(patched, names)
        want = patched(x)
        ref = model(x)
        assert (want - ref).abs().max() > 1e-3 * ref.abs().max()  # the modules act
    step = patched.cbam_recipe["steps"][-1]
    assert step["module"] == module and step["options"] == {"init": "identity"}
    rebuilt = apply_recipe(build(), json.loads(json.dumps(patched.cbam_recipe)))
    rebuilt.load_state_dict(patched.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), want, atol=1e-6, rtol=0)
    return patched


@pytest.mark.parametrize("module", NEW)
def test_insert_into_resnet18_every_block(module):
    _check_insertion(torchvision.models.resnet18, module, torch.randn(2, 3, 64, 64), expect=8)


@pytest.mark.parametrize("module", sorted(set(NEW) - {"gam"}))  # GAM adds ~0.5 G parameters to ResNet-50's blocks
def test_insert_into_resnet50_every_bottleneck(module):
    _check_insertion(torchvision.models.resnet50, module, torch.randn(2, 3, 64, 64), expect=16)


def test_gam_into_resnet50_last_stage():
    _check_insertion(torchvision.models.resnet50, "gam", torch.randn(2, 3, 64, 64), after="stage", expect=None)


@pytest.mark.parametrize("module", NEW)
def test_insert_into_mobilenet_v2_inverted_residuals(module):
    _check_insertion(torchvision.models.mobilenet_v2, module, torch.randn(2, 3, 64, 64), expect=10)


@pytest.mark.parametrize("module", NEW)
def test_insert_into_a_3d_model(module):
    """torchvision's R3D-18 (N, 3, T, H, W): every module's definition extends to 3-D maps."""
    _check_insertion(torchvision.models.video.r3d_18, module, torch.randn(2, 3, 4, 32, 32), expect=8)


class _Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 3, padding=1)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return y + self.conv(torch.relu(y))


def test_a_module_that_refuses_the_rank_skips_the_site_with_the_reason():
    x = torch.randn(2, 2, 16)
    sites = find_sites(_Net1d(), "conv", (x,))
    assert any(s.used for s in sites)
    with pytest.raises(CBAMInsertError, match="coord handles 2-D, 3-D feature maps, not dims=1"):
        insert_attention(_Net1d(), after="conv", example_inputs=(x,), module="coord")
    patched = insert_attention(_Net1d(), after="conv", example_inputs=(x,), module="eca")
    assert patched.cbam_report.modules == ["eca_stem", "eca_conv"]


def test_patching_twice_is_refused_whatever_the_module():
    x = torch.randn(1, 3, 64, 64)
    patched = insert_attention(torchvision.models.resnet18(), example_inputs=(x,), module="se")
    with pytest.raises(CBAMInsertError, match="already has se attention"):
        insert_attention(patched, example_inputs=(x,), module="eca")
    again = insert_attention(patched, example_inputs=(x,), module="eca", allow_repatch=True)
    assert len(again.cbam_recipe["steps"]) == 2 and again.cbam_report.modules[0] == "layer1.0.eca_add"


def test_module_options_are_checked_once_with_one_line_errors():
    m = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(CBAMInsertError, match=r"^unknown se option\(s\) dilation; valid: init, reduction$"):
        insert_attention(m, example_inputs=(x,), module="se", dilation=2)
    with pytest.raises(CBAMInsertError, match="^reduction must be a positive integer, got -1$"):
        insert_attention(m, example_inputs=(x,), module="bam", reduction=-1)
    with pytest.raises(CBAMInsertError, match="^unknown attention module 'sk'"):
        insert_attention(m, example_inputs=(x,), module="sk")
    with pytest.raises(CBAMInsertError, match="insert_cbam inserts CBAM"):
        insert_cbam(m, example_inputs=(x,), module="se")


def test_insert_cbam_is_insert_attention_with_cbam():
    x = torch.randn(1, 3, 64, 64)
    a = insert_cbam(torchvision.models.resnet18(), example_inputs=(x,), seed=0, reduction=8)
    b = insert_attention(torchvision.models.resnet18(), example_inputs=(x,), seed=0, module="cbam", reduction=8)
    assert a.cbam_recipe["steps"] == b.cbam_recipe["steps"]
    assert a.cbam_recipe["steps"][0]["module"] == "cbam" and a.cbam_recipe["steps"][0]["options"] == {"reduction": 8}


def test_a_recipe_written_before_other_modules_replays_as_cbam():
    x = torch.randn(1, 3, 64, 64)
    patched = insert_cbam(torchvision.models.resnet18(), example_inputs=(x,), kernel_size=3)
    old = json.loads(json.dumps(patched.cbam_recipe))
    step = old["steps"][0]
    step["cbam"] = step.pop("options")
    del step["module"]
    rebuilt = apply_recipe(torchvision.models.resnet18(), old)
    rebuilt.load_state_dict(patched.state_dict())
    assert rebuilt.layer1[0].cbam_add.spatial_gate.conv.kernel_size == (3, 3)


def test_saved_files_load_and_export_for_another_module(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = torch.rand(1, 3, 32, 32)
    patched = insert_attention(torchvision.models.resnet18(), example_inputs=(x,), module="eca", seed=0)
    _perturb(patched, patched.cbam_report.modules)
    with torch.no_grad():
        want = patched.eval()(x)
    loaded = load_model(save_model(patched, tmp_path / "p.pt"))  # the safe loader: recipe replayed
    save_model(patched, tmp_path / "p.safetensors")
    from_weights = load_model(tmp_path / "p.safetensors", arch="torchvision:resnet18")
    onnx = save_model(patched, tmp_path / "p.onnx", example_inputs=(x,))
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_weights.eval()(x), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_cost_report_counts_each_module_per_site():
    x = torch.rand(1, 3, 224, 224)
    model = torchvision.models.resnet18()
    patched = insert_attention(model, example_inputs=(x,), module="se")
    cost = cost_report(model, patched, (x,), modules=patched.cbam_report.modules)
    for name, (params, macs) in cost.per_module.items():
        c = patched.get_submodule(name).channels
        assert params == 2 * c * (c // 16) + c // 16 + c and macs == 2 * c * (c // 16)  # two FC layers, one sample
    assert cost.params_delta == sum(p for p, _ in cost.per_module.values())


# ----------------------------------------------------------------------------- the user's own class


def test_a_user_class_by_import_path_or_object():
    x = torch.randn(2, 3, 64, 64)
    model = torchvision.models.resnet18().eval()
    for module in ("_user_attention:KeepShape", _user_attention.KeepShape, "_user_attention:make_gate"):
        patched = insert_attention(model, example_inputs=(x,), module=module, init="identity")
        names = patched.cbam_report.modules
        assert names[0] == "layer1.0.attn_add" and len(names) == 8
        inner = patched.get_submodule(names[0]).inner
        assert isinstance(inner, (_user_attention.KeepShape, _user_attention._Gate))
        with torch.no_grad():
            torch.testing.assert_close(patched.eval()(x), model(x), atol=1e-5, rtol=0)
    step = insert_attention(model, example_inputs=(x,), module="_user_attention:KeepShape", bias=2.0).cbam_recipe["steps"][0]
    assert step["module"] == "_user_attention:KeepShape" and step["options"] == {"bias": 2.0}


def test_a_user_class_that_changes_the_shape_is_refused_in_one_line():
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(CBAMInsertError, match=r"^_user_attention:Shrink at layer1\.0\.add returns \[1, 32, 16, 16\] "
                       r"for a \[1, 64, 16, 16\] map; an attention module must keep the shape$"):  # fmt: skip
        insert_attention(torchvision.models.resnet18(), example_inputs=(x,), module="_user_attention:Shrink")
    with pytest.raises(CBAMInsertError, match="cannot import no_such_pkg"):
        insert_attention(torchvision.models.resnet18(), example_inputs=(x,), module="no_such_pkg.mod:Cls")


def test_a_recipe_with_a_user_class_replays_only_with_trust():
    x = torch.randn(1, 3, 64, 64)
    patched = insert_attention(torchvision.models.resnet18(), example_inputs=(x,), module="_user_attention:KeepShape")
    with pytest.raises(CBAMInsertError, match="builds the user class _user_attention:KeepShape.*trust=True"):
        apply_recipe(torchvision.models.resnet18(), patched.cbam_recipe)
    rebuilt = apply_recipe(torchvision.models.resnet18(), patched.cbam_recipe, trust=True)
    rebuilt.load_state_dict(patched.state_dict())


# ----------------------------------------------------------------------------- the command line


def test_cli_module_and_its_options(tmp_path):
    from typer.testing import CliRunner

    from cbam_insert.cli import app

    runner = CliRunner()
    out = tmp_path / "r18_se.pt"
    res = runner.invoke(app, ["torchvision:resnet18", "--input-shape", "1,3,64,64", "--module", "se",
                              "--reduction", "8", "--init", "identity", "-o", str(out), "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    model = load_model(out)
    assert model.cbam_recipe["steps"][0]["module"] == "se"
    assert model.cbam_recipe["steps"][0]["options"] == {"reduction": 8, "init": "identity"}
    assert model.layer1[0].se_add.fc1.out_features == 8
    res = runner.invoke(app, ["torchvision:resnet18", "--module", "se", "--kernel-size", "3", "--dry-run"])
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: --kernel-size is not an option of --module se (its options: --init, --reduction)"
    res = runner.invoke(app, ["torchvision:resnet18", "--module", "coord", "--no-channel", "--dry-run"])
    assert res.exit_code == 1 and "--channel is not an option of --module coord" in res.stderr
    res = runner.invoke(app, ["torchvision:resnet18", "--input-shape", "1,3,64,64", "--module", "triplet",
                              "--kernel-size", "3", "--dry-run", "--json", "--bench"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["module"] == "triplet" and data["params"]["delta"] == 8 * 3 * (2 * 9 + 2)
    assert sorted(data["bench"]["per_site_ms"]) == sorted(data["modules"]) and len(data["modules"]) == 8
    assert all(v > 0 for v in data["bench"]["per_site_ms"].values())
    out = tmp_path / "r18_gam.pt"
    res = runner.invoke(app, ["torchvision:resnet18", "--input-shape", "1,3,64,64", "--module", "gam", "--groups", "4",
                              "--after", "stage", "-o", str(out), "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    model = load_model(out)
    assert model.cbam_recipe["steps"][0]["options"] == {"groups": 4}
    gams = [m for m in model.modules() if isinstance(m, GAM)]
    assert len(gams) == 4 and all(m.spatial[0].groups == 4 for m in gams)
    res = runner.invoke(app, ["torchvision:resnet18", "--module", "gam", "--groups", "0", "--dry-run"])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "groups must be" in res.stderr


def test_cli_every_declared_option_is_a_flag():
    from typer.testing import CliRunner

    from cbam_insert.cli import app

    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    for name in ATTENTION:
        for o in declared(config_of(name)):
            assert o.flag in res.stdout, o.flag


def test_cli_user_class_and_its_shape_check():
    from typer.testing import CliRunner

    from cbam_insert.cli import app

    runner = CliRunner()
    args = ["torchvision:resnet18", "--input-shape", "1,3,64,64", "--dry-run", "--json"]
    res = runner.invoke(app, [*args, "--module", "_user_attention:KeepShape"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["module"] == "_user_attention:KeepShape"
    res = runner.invoke(app, [*args, "--module", "_user_attention:Shrink"])
    assert res.exit_code == 1 and "an attention module must keep the shape" in res.stderr
    res = runner.invoke(app, [*args, "--module", "_user_attention:KeepShape", "--reduction", "4"])
    assert res.exit_code == 1 and "takes no options from the command line but --init" in res.stderr


def test_a_saved_file_whose_recipe_builds_a_user_class_loads_only_with_trust(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    patched = insert_attention(torchvision.models.resnet18(), example_inputs=(x,), module="_user_attention:KeepShape")
    path = save_model(patched, tmp_path / "user.pt")
    with pytest.raises(CBAMInsertError, match=r"user\.pt: the recipe builds the user class _user_attention:KeepShape"):
        load_model(path)
    loaded = load_model(path, trust=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), patched.eval()(x))


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_a_pickled_module_loads_with_the_safe_loader(name, tmp_path):
    """The modules keep only tensors and plain data: a torch.save of a model holding one loads without trust."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ATTENTION[name](8, init="identity")).eval()
    torch.save(m, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), m(x))
    assert loaded[1].extra_repr() == m[1].extra_repr()
