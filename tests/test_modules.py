"""CBAM, ChannelAttention and SpatialAttention: maths, options, identity init, dtypes, export.

The reference below is written from the paper's equations (Woo et al., ECCV 2018) with its own ops
(flatten + explicit matmuls + functional convolutions), and gets the module's weights copied in.
"""

from __future__ import annotations

import copy
import io
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from cbam_insert import CBAM, ChannelAttention, SpatialAttention
from cbam_insert.modules import cbam_parameter_count

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def ref_channel_gate(x, w1, w2, b1=None, b2=None, pool_types=("avg", "max")):
    """Mc(F) = sigmoid(sum_p MLP(Pool_p(F))) as an (N, C, 1, ...) tensor."""
    flat = x.flatten(2)
    pools = {
        "avg": lambda: flat.sum(-1) / flat.shape[-1],
        "max": lambda: flat.max(-1).values,
        "lp": lambda: flat.pow(2).sum(-1).sqrt(),
        "lse": lambda: flat.exp().sum(-1).log(),
    }
    total = 0
    for p in pool_types:
        h = torch.relu(pools[p]() @ w1.t() + (0 if b1 is None else b1))
        total = total + h @ w2.t() + (0 if b2 is None else b2)
    return torch.sigmoid(total).view(*x.shape[:2], *[1] * (x.dim() - 2))


def ref_spatial_gate(x, wconv, max_first=False, bn=None):
    """Ms(F) = sigmoid(conv([mean_c F ; max_c F])) as an (N, 1, ...) tensor; bn = (weight, bias, mean, var)
    for eval-mode BatchNorm or ("batch", weight, bias) for training-mode BatchNorm."""
    mean = x.sum(1, keepdim=True) / x.shape[1]
    mx = x.max(1, keepdim=True).values
    pooled = torch.cat([mx, mean] if max_first else [mean, mx], 1)
    k = wconv.shape[-1]
    z = CONV[x.dim() - 2](pooled, wconv, padding=k // 2)
    if bn is not None:
        if bn[0] == "batch":
            _, w, b = bn
            dims = [0] + list(range(2, z.dim()))
            mu, var = z.mean(dims, keepdim=True), z.var(dims, unbiased=False, keepdim=True)
        else:
            w, b, mu, var = bn
        z = (z - mu) / torch.sqrt(var + 1e-5) * w + b
    return torch.sigmoid(z)


def ref_cbam(m: CBAM, x: torch.Tensor, batch_stats: bool = False) -> torch.Tensor:
    """The reference CBAM with the weights of ``m``."""
    cg, sg = m.channel_gate, m.spatial_gate

    def channel(t):
        return ref_channel_gate(t, cg.fc1.weight, cg.fc2.weight, cg.fc1.bias, cg.fc2.bias, cg.pool_types)

    def spatial(t):
        bn = None
        if sg.norm is not None:
            n = sg.norm
            bn = ("batch", n.weight, n.bias) if batch_stats else (n.weight, n.bias, n.running_mean, n.running_var)
        return ref_spatial_gate(t, sg.conv.weight, sg.max_first, bn)

    if m.order == "parallel":
        out = x
        if cg is not None:
            out = out * channel(x)
        if sg is not None:
            out = out * spatial(x)
        return out
    steps = [(cg, channel), (sg, spatial)]
    if m.order == "spatial_first":
        steps.reverse()
    out = x
    for gate, fn in steps:
        if gate is not None:
            out = out * fn(out)
    return out


def randomize(m: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights everywhere, including batch-norm affine parameters and statistics."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "weight" in name else 0.2))
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return m


SHAPES = [
    pytest.param((2, 32, 9, 11), 2, id="2d"),
    pytest.param((3, 8, 5, 7), 2, id="2d-C<reduction"),
    pytest.param((1, 1, 4, 4), 2, id="2d-C=1"),
    pytest.param((2, 24, 17), 1, id="1d"),
    pytest.param((2, 16, 3, 5, 6), 3, id="3d"),
    pytest.param((2, 40, 7, 7), 2, id="2d-7x7"),
    pytest.param((2, 16, 48, 48), 2, id="2d-large-map"),  # past _NATIVE_CONV_POSITIONS: oneDNN's conv
]


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize(("shape", "dims"), SHAPES)
def test_default_cbam_matches_reference_in_eval_and_training(shape, dims):
    m = randomize(CBAM(shape[1], dims=dims))
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref_cbam(m, x), atol=1e-6, rtol=1e-6)
    xg = x.clone().requires_grad_()
    out = m(xg)  # the training path (custom autograd function)
    xr = x.clone().requires_grad_()
    ref = ref_cbam(m, xr)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    params = list(m.parameters())
    got = torch.autograd.grad(out, [xg, *params], g)
    want = torch.autograd.grad(ref, [xr, *params], g)
    # a parameter's gradient sums over every position; float32 rounding grows with the map
    rtol = 1e-5 if x[0, 0].numel() <= 1024 else 1e-4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=rtol)


def test_default_cbam_is_the_seed_module():
    m = CBAM(64)
    assert m.channel_gate.hidden == 4 and m.spatial_gate.kernel_size == 7
    assert m.channel_gate.fc1.bias is None and m.channel_gate.fc2.bias is None and m.spatial_gate.conv.bias is None
    assert m.spatial_gate.norm is None and not m.spatial_gate.max_first and m.order == "channel_first"
    assert m.gamma is None


def test_channels_last_input_gives_same_values_and_grads():
    m = randomize(CBAM(32))
    x = torch.randn(2, 32, 6, 7)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    xr = x.clone().requires_grad_()
    out, ref = m(xc), ref_cbam(m, xr)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, xc, g)[0], torch.autograd.grad(ref, xr, g)[0], atol=1e-5, rtol=1e-5
    )


def test_max_ties_share_the_gradient_like_amax():
    """Post-ReLU maps have ties (zeros); the fused backward splits a max's gradient as amax does."""
    m = randomize(CBAM(16)).double()
    x = torch.relu(torch.randn(2, 16, 5, 5, dtype=torch.float64))
    x[:, 3] = 0.0  # a channel whose spatial max is tied everywhere
    x[:, :, 1, 1] = 0.0  # a position where every channel ties
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = m(xg)
    with torch.enable_grad():
        plain = m._attend(xr)  # plain tensor ops: amax's own backward
    g = torch.randn_like(out)
    params = list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, [xg, *params], g), torch.autograd.grad(plain, [xr, *params], g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("shape", [(5, 24, 7, 7), (3, 16, 6, 10)], ids=["odd-map", "even-map"])
def test_blocked_passes_give_the_same_values_and_grads(shape, monkeypatch):
    """Tiny block sizes force the sample-blocked pooling, the row-blocked max gradient and the folds."""
    from cbam_insert.fast import eager as modules

    m = randomize(CBAM(shape[1]))
    x = torch.relu(torch.randn(shape))  # zeros: tied maxima too
    xr = x.clone().requires_grad_()
    ref = ref_cbam(m, xr)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [xr, *m.parameters()], g)
    monkeypatch.setattr(modules, "_BLOCK_BYTES", 64)
    monkeypatch.setattr(modules, "_SCRATCH_BYTES", 64)
    monkeypatch.setattr(modules, "_SPATIAL_FOLD_ROWS", 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-6)
    xg = x.clone().requires_grad_()
    out = m(xg)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    got = torch.autograd.grad(out, [xg, *m.parameters()], g)
    xp = x.clone().requires_grad_()
    with torch.enable_grad():
        plain = m._attend(xp)  # amax's own backward: ties shared evenly
    for a, b in zip(got, torch.autograd.grad(plain, [xp, *m.parameters()], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # where no channel is all zeros (no tied spatial maximum) the reference's gradient is the same
    untied = x.flatten(2).amax(-1) > 0
    torch.testing.assert_close(got[0][untied], want[0][untied], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        pytest.param({}, (2, 6, 4, 5), id="default"),
        pytest.param({"variant": "official"}, (3, 6, 4, 5), id="official"),
        # biases without the norm: the training function's hand-written small-part gradients
        pytest.param({"mlp_bias": True, "pool_types": ("max", "avg")}, (2, 6, 4, 5), id="mlp-bias-max-first"),
        pytest.param({"dims": 1}, (2, 5, 7), id="1d"),
        pytest.param({"dims": 3, "kernel_size": 3}, (2, 4, 2, 3, 3), id="3d"),
        pytest.param({"pool_types": ("lp", "lse"), "order": "spatial_first"}, (2, 6, 4, 4), id="lp-lse-spatial-first"),
        pytest.param({"order": "parallel", "init": "identity"}, (2, 6, 4, 4), id="parallel-identity"),
    ],
)
def test_gradcheck_float64_input_and_parameters(kwargs, shape):
    m = randomize(CBAM(shape[1], reduction=2, **kwargs)).double()
    if kwargs.get("mlp_bias"):  # the conv's bias too (no constructor switch for it)
        conv = m.spatial_gate.conv
        conv.bias = torch.nn.Parameter(torch.randn(1, dtype=torch.float64))
    if m.gamma is not None:
        with torch.no_grad():
            m.gamma.fill_(0.7)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


# ---------------------------------------------------------------- parameters and options


@pytest.mark.parametrize("channels", [1, 8, 15, 16, 17, 64, 256, 2048])
@pytest.mark.parametrize("k", [3, 7])
def test_parameter_count_formula(channels, k):
    m = CBAM(channels, kernel_size=k)
    expected = 2 * channels * max(1, channels // 16) + 2 * k * k
    assert sum(p.numel() for p in m.parameters()) == expected == cbam_parameter_count(channels, 16, k)


def test_official_variant_parameter_count_adds_biases_and_batchnorm():
    c, h, k = 64, 4, 7
    m = CBAM(c, variant="official")
    assert sum(p.numel() for p in m.parameters()) == 2 * c * h + h + c + 2 * k * k + 2
    assert m.spatial_gate.max_first and isinstance(m.spatial_gate.norm, torch.nn.BatchNorm2d)
    assert m.spatial_gate.norm.momentum == 0.01


def test_hidden_and_reduction_set_the_mlp_width():
    assert CBAM(64, hidden=5).channel_gate.fc1.out_features == 5
    assert CBAM(64, reduction=8).channel_gate.hidden == 8
    assert CBAM(8).channel_gate.hidden == 1  # C < reduction: never 0
    assert ChannelAttention(3, reduction=16).hidden == 1


OPTIONS = [
    pytest.param({"pool_types": ("avg",)}, id="avg"),
    pytest.param({"pool_types": ("max",)}, id="max"),
    pytest.param({"pool_types": ("lp",)}, id="lp"),
    pytest.param({"pool_types": ("lse",)}, id="lse"),
    pytest.param({"pool_types": ("avg", "max", "lp", "lse")}, id="all-pools"),
    pytest.param({"pool_types": ("max", "avg")}, id="max-avg"),
    pytest.param({"spatial": False}, id="channel-only"),
    pytest.param({"channel": False}, id="spatial-only"),
    pytest.param({"order": "spatial_first"}, id="spatial-first"),
    pytest.param({"order": "parallel"}, id="parallel"),
    pytest.param({"variant": "official"}, id="official"),
    pytest.param({"mlp_bias": True}, id="mlp-bias"),
    pytest.param({"spatial_norm": True}, id="spatial-norm"),
    pytest.param({"variant": "official", "mlp_bias": False, "spatial_norm": False}, id="official-overridden"),
    pytest.param({"kernel_size": 3}, id="k3"),
    pytest.param({"kernel_size": 7}, id="k7"),
    pytest.param({"kernel_size": 1}, id="k1"),
    pytest.param({"hidden": 7}, id="hidden"),
    pytest.param({"reduction": 4}, id="reduction"),
]


@pytest.mark.parametrize("kwargs", OPTIONS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_every_option_matches_reference(kwargs, training):
    m = randomize(CBAM(24, **kwargs)).train(training)
    x = torch.randn(3, 24, 6, 5)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = m(xg)
    ref = ref_cbam(m, xr, batch_stats=training)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    params = [p for p in m.parameters()]
    for a, b in zip(torch.autograd.grad(out, [xg, *params], g), torch.autograd.grad(ref, [xr, *params], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_official_variant_in_training_updates_batchnorm_statistics_once():
    fused = randomize(CBAM(16, variant="official")).train()
    plain = randomize(CBAM(16, variant="official")).train()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, 16, 6, 6)
    fused(x.clone().requires_grad_()).sum().backward()  # fused autograd function
    with torch.enable_grad():
        plain._attend(x.clone().requires_grad_()).sum().backward()
    for name, buf in fused.named_buffers():
        torch.testing.assert_close(buf, dict(plain.named_buffers())[name], atol=1e-7, rtol=1e-6)
    assert fused.spatial_gate.norm.num_batches_tracked.item() == 1


def test_gates_alone_match_reference():
    x = torch.randn(2, 12, 5, 6)
    cg = randomize(ChannelAttention(12, reduction=4, pool_types=("avg", "max", "lp", "lse")))
    want = ref_channel_gate(x, cg.fc1.weight, cg.fc2.weight, pool_types=cg.pool_types).view(2, 12)
    torch.testing.assert_close(cg(x), want, atol=1e-6, rtol=1e-6)
    sg = randomize(SpatialAttention(3, order="max_mean"))
    torch.testing.assert_close(sg(x), ref_spatial_gate(x, sg.conv.weight, max_first=True), atol=1e-6, rtol=1e-6)


def test_frozen_parameters_or_frozen_input_still_get_the_right_gradients():
    m = randomize(CBAM(16))
    x = torch.randn(2, 16, 5, 5)
    m.requires_grad_(False)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(
        torch.autograd.grad(m(xg).sum(), xg)[0], torch.autograd.grad(ref_cbam(m, xr).sum(), xr)[0]
    )
    m.requires_grad_(True)
    m.channel_gate.fc1.weight.requires_grad_(False)
    m(x).sum().backward()  # input needs no grad, parameters do
    ref = ref_cbam(m, x).sum()
    for p in (m.channel_gate.fc2.weight, m.spatial_gate.conv.weight):
        torch.testing.assert_close(p.grad, torch.autograd.grad(ref, p, retain_graph=True)[0], atol=1e-5, rtol=1e-5)
    assert m.channel_gate.fc1.weight.grad is None


def test_inference_does_not_modify_the_input():
    m = randomize(CBAM(16))
    x = torch.randn(2, 16, 5, 5)
    before = x.clone()
    with torch.no_grad():
        m(x)
    m(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(2, 16, 5, 5), (64, 64, 32, 32)], ids=["one-block", "blocked"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reuse_input_writes_the_output_into_the_input_in_inference(shape, layout):
    m = randomize(CBAM(shape[1], reuse_input=True)).eval()
    x = torch.randn(*shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    want = ref_cbam(m, x.clone())
    for ctx in (torch.no_grad, torch.inference_mode):
        y = x.clone()
        with ctx():
            out = m(y)
        assert out.data_ptr() == y.data_ptr()
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    assert "reuse_input=True" in repr(m)


@pytest.mark.parametrize(
    "case", ["training", "identity-init", "strided", "inference-tensor", "other-order", "trace"]
)
def test_reuse_input_is_ignored_where_it_would_be_wrong(case):
    kwargs = {"init": "identity"} if case == "identity-init" else {"order": "parallel"} if case == "other-order" else {}
    m = randomize(CBAM(16, reuse_input=True, **kwargs))
    x = torch.randn(2, 16, 6, 6)
    if case == "strided":
        x = torch.randn(2, 16, 6, 12)[..., ::2]
    if case == "inference-tensor":
        with torch.inference_mode():
            x = torch.randn(2, 16, 6, 6)
    before = x.clone()
    if case == "training":
        out = m(x.requires_grad_())
        out.sum().backward()
    elif case == "trace":
        with torch.no_grad():
            out = torch.jit.trace(m, x)(x)
    else:
        with torch.no_grad():
            out = m(x)
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x.detach(), before)


def test_reuse_input_must_be_a_bool():
    with pytest.raises(ValueError, match="reuse_input"):
        CBAM(16, reuse_input=1)


# ---------------------------------------------------------------- identity init


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"variant": "official"}, {"order": "parallel", "pool_types": ("lse",)}, {"dims": 1}, {"dims": 3}],
    ids=["default", "official", "parallel-lse", "1d", "3d"],
)
def test_identity_init_returns_the_input_in_train_and_eval_and_learns(kwargs):
    dims = kwargs.get("dims", 2)
    m = randomize(CBAM(16, init="identity", **kwargs))
    with torch.no_grad():
        m.gamma.zero_()
    x = torch.randn([4, 16] + [5] * dims)
    for training in (True, False):
        m.train(training)
        torch.testing.assert_close(m(x), x, atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(m(x), x, atol=1e-6, rtol=0)
    m.train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    target = torch.randn_like(x)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(m(x.requires_grad_()), target).backward()
        opt.step()
    unmoved = [n for n, p in m.named_parameters() if torch.equal(p, before[n])]
    assert not unmoved, f"parameters that did not learn: {unmoved}"


def test_identity_init_gamma_is_one_parameter_and_off_by_default():
    assert sum(p.numel() for p in CBAM(32, init="identity").parameters()) == cbam_parameter_count(32) + 1
    assert "gamma" not in dict(CBAM(32).named_parameters())


# ---------------------------------------------------------------- dtypes and devices


def _half_supported() -> bool:
    try:
        CBAM(8).half()(torch.randn(1, 8, 4, 4).half())
    except RuntimeError:
        return False
    return True


DTYPES = [
    pytest.param(torch.float64, 1e-10, id="float64"),
    pytest.param(torch.bfloat16, 5e-2, id="bfloat16"),
    pytest.param(
        torch.float16,
        1e-2,
        id="float16",
        marks=pytest.mark.skipif(not _half_supported(), reason="no float16 on this CPU"),
    ),
]


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
@pytest.mark.parametrize(
    "kwargs", [{}, {"variant": "official"}, {"order": "spatial_first"}], ids=["default", "official", "spatial-first"]
)
def test_low_and_high_precision_dtypes(dtype, tol, kwargs):
    m32 = randomize(CBAM(16, **kwargs)).eval()
    m = CBAM(16, **kwargs).eval()
    m.load_state_dict(m32.state_dict())
    m.to(dtype)
    assert all(p.dtype == dtype for p in m.parameters())
    x = torch.randn(2, 16, 6, 6)
    xd = x.to(dtype).requires_grad_()
    out = m(xd)
    assert out.dtype == dtype
    exact = copy.deepcopy(m).double()
    torch.testing.assert_close(out.double(), ref_cbam(exact, xd.detach().double()), atol=tol, rtol=tol)
    out.float().sum().backward()
    assert xd.grad.dtype == dtype and torch.isfinite(xd.grad.float()).all()


def test_to_moves_parameters_and_buffers():
    m = CBAM(16, variant="official", init="identity").to(device="cpu", dtype=torch.float64)
    assert {t.dtype for t in m.parameters()} == {torch.float64}
    assert m.spatial_gate.norm.running_mean.dtype == torch.float64
    assert m(torch.randn(1, 16, 4, 4, dtype=torch.float64)).dtype == torch.float64
    assert m.to("meta")(torch.empty(1, 16, 4, 4, device="meta", dtype=torch.float64)).device.type == "meta"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"channels": 0}, "channels"),
        ({"channels": -3}, "channels"),
        ({"channels": 2.5}, "channels"),
        ({"channels": True}, "channels"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": -3}, "kernel_size"),
        ({"pool_types": ("avg", "median")}, "pool_types"),
        ({"pool_types": ()}, "pool_types"),
        ({"pool_types": ("avg", "avg")}, "pool_types"),
        ({"variant": "paper"}, "variant"),
        ({"order": "random"}, "order"),
        ({"init": "zeros"}, "init"),
        ({"dims": 4}, "dims"),
        ({"reduction": 0}, "reduction"),
        ({"hidden": 0}, "hidden"),
        ({"mlp_bias": "yes"}, "mlp_bias"),
        ({"spatial_norm": 1}, "spatial_norm"),
        ({"channel": False, "spatial": False}, "channel"),
    ],
)
def test_bad_arguments_raise_at_construction_naming_the_argument(kwargs, name):
    kwargs = {"channels": 16, **kwargs}
    with pytest.raises(ValueError, match=name):
        CBAM(**kwargs)


@pytest.mark.parametrize(
    ("dims", "shape", "expected"),
    [
        (2, (2, 8, 5, 5), r"\(N, 16, \*, \*\), got \[2, 8, 5, 5\]"),
        (2, (2, 16, 5), r"\(N, 16, \*, \*\), got \[2, 16, 5\]"),
        (1, (2, 16, 5, 5), r"\(N, 16, \*\), got \[2, 16, 5, 5\]"),
        (3, (16, 5, 5, 5), r"\(N, 16, \*, \*, \*\), got \[16, 5, 5, 5\]"),
    ],
)
def test_wrong_input_raises_at_forward_with_actual_and_expected_shape(dims, shape, expected):
    with pytest.raises(ValueError, match=expected):
        CBAM(16, dims=dims)(torch.randn(shape))


# ---------------------------------------------------------------- compilers and exporters

EXPORT_CASES = [
    pytest.param({}, id="default"),
    pytest.param({"variant": "official", "init": "identity"}, id="official-identity"),
    pytest.param({"order": "parallel", "pool_types": ("lp", "lse")}, id="parallel-lp-lse"),
]


def _model(kwargs, channels=16):
    m = randomize(CBAM(channels, **kwargs)).eval()
    if m.gamma is not None:
        with torch.no_grad():
            m.gamma.fill_(0.5)
    return m


@pytest.mark.parametrize("kwargs", EXPORT_CASES)
def test_torch_jit_script_matches_eager_forward_and_backward(kwargs):
    m = _model(kwargs).train()
    scripted = torch.jit.script(m)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(scripted(x), m(x))
    xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    scripted(xs).sum().backward()
    m(xe).sum().backward()
    torch.testing.assert_close(xs.grad, xe.grad, atol=1e-6, rtol=1e-5)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(x), m(x))


def test_torch_jit_trace_matches_eager():
    m = _model({})
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        traced = torch.jit.trace(m, x)
    torch.testing.assert_close(traced(x), m(x))


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_matches_eager_forward_and_backward(backend):
    torch._dynamo.reset()
    m = _model({"variant": "official", "init": "identity"}).train()
    compiled = torch.compile(m, backend=backend)
    x = torch.randn(2, 16, 6, 6)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xc)
    torch.testing.assert_close(out, m(xe))
    out.sum().backward()
    m(xe).sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    torch._dynamo.reset()
    m = _model({})
    compiled = torch.compile(m)
    x = torch.randn(2, 16, 6, 6)
    start = time.perf_counter()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), atol=1e-6, rtol=1e-5)
    assert time.perf_counter() - start < 300


@pytest.mark.parametrize("kwargs", EXPORT_CASES)
def test_torch_export_matches_eager(kwargs):
    m = _model(kwargs)
    x = torch.randn(2, 16, 6, 6)
    ep = torch.export.export(m, (x,))
    assert "CBAMFunction" not in str(ep.graph)
    y = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(ep.module()(y), m(y))


@pytest.mark.parametrize("kwargs", EXPORT_CASES)
def test_onnx_export_runs_in_onnxruntime(kwargs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = _model(kwargs)
    x = torch.randn(2, 16, 6, 6)
    path = tmp_path / "cbam.onnx"
    torch.onnx.export(m, (x,), str(path), opset_version=17, dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    y = torch.randn(2, 16, 6, 6)
    (got,) = session.run(None, {name: y.numpy()})
    with torch.no_grad():
        want = m(y)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spatial", [(14, 14), (7, 7)])
def test_empty_batch_passes_through(spatial):
    """Mask R-CNN's mask head sees zero RoIs when nothing is detected."""
    cbam = CBAM(256)
    x = torch.zeros(0, 256, *spatial, requires_grad=True)
    out = cbam(x)
    assert out.shape == x.shape
    out.sum().backward()
    with torch.no_grad():
        assert cbam.eval()(x).shape == x.shape


def test_training_with_frozen_layers_and_hooks_matches_reference():
    """The training function's hand-written small-part gradients skip frozen parameters; a hook
    on one of the small layers makes it use autograd instead, and the hook runs."""
    m = randomize(CBAM(24))
    m.spatial_gate.conv.weight.requires_grad_(False)
    x = torch.randn(2, 24, 6, 6)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = m(xg), ref_cbam(m, xr)
    g = torch.randn_like(out)
    trainable = [p for p in m.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(out, [xg, *trainable], g), torch.autograd.grad(ref, [xr, *trainable], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    calls = []
    m.channel_gate.fc1.register_forward_hook(lambda *args: calls.append(1))
    out = m(x.clone().requires_grad_())
    assert calls and out.requires_grad
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
