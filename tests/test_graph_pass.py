"""The graph pass on real architectures and on small models built to probe one rule each."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cbam_insert import CBAM, CBAMInsertError, find_sites, insert_cbam


def used(sites):
    return [s for s in sites if s.used]


def cbam_inputs(model):
    """For each CBAM call in the (eval) graph: the name of the node that feeds it."""
    return {str(n.target): n.args[0].meta.get("cbam_key") for n in model.graph.nodes if n.op == "call_module" and "cbam" in str(n.target)}


# ----------------------------------------------------------------------------- site counts


@pytest.mark.parametrize(
    "name,after,expected",
    [
        ("resnet18", "block", 8),
        ("resnet18", "conv", 20),
        ("resnet50", "block", 16),
        ("mobilenet_v2", "block", 10),
        ("efficientnet_b0", "block", 9),
        ("convnext_tiny", "block", 18),
        ("resnet50", "stage", 4),
    ],
)
def test_site_counts_match_the_architectures(name, after, expected):
    model = torchvision.models.get_model(name, weights=None)
    assert len(used(find_sites(model, after=after))) == expected


def test_stage_sites_are_resnet_layers():
    names = [s.name for s in used(find_sites(torchvision.models.resnet18(), after="stage"))]
    assert names == ["layer1", "layer2", "layer3", "layer4"]


def test_site_records_name_kind_channels_shape_and_reason():
    site = used(find_sites(torchvision.models.resnet18(), after="block"))[0]
    assert (site.name, site.kind, site.channels, site.shape) == ("layer1.0.add", "block", 64, (1, 64, 56, 56))
    assert "identity shortcut" in site.reason
    assert site.module_name == "layer1.0.cbam_add"


def test_module_placement_by_glob_regex_and_class():
    model = torchvision.models.resnet50()
    assert [s.name for s in used(find_sites(model, after="layer4.*.bn3"))] == [f"layer4.{i}.bn3" for i in range(3)]
    assert len(used(find_sites(model, after="re:layer[34]\\.\\d+\\.bn3"))) == 9
    assert [s.name for s in used(find_sites(model, after="Bottleneck"))][:2] == ["layer1.0", "layer1.1"]
    assert len(used(find_sites(model, after="Bottleneck"))) == 16


# ----------------------------------------------------------------------------- selection


def test_selection_filters():
    model = torchvision.models.resnet50()
    names = lambda **kw: [s.name for s in used(find_sites(model, after="block", **kw))]
    assert names(stages=(3, 4)) == [n for n in names() if n.startswith(("layer3", "layer4"))]
    assert names(include="layer2.*") == ["layer2.0.add", "layer2.1.add", "layer2.2.add", "layer2.3.add"]
    assert "layer1.0.add" not in names(exclude=["layer1.*"])
    assert names(every=4) == names()[::4]
    assert names(max_sites=3) == names()[:3]
    assert all(s.channels >= 1024 for s in used(find_sites(model, after="block", min_channels=1024)))
    assert len(names(min_channels=1024)) == 9


def test_unknown_pattern_is_an_error_naming_it():
    with pytest.raises(CBAMInsertError, match="nosuchlayer"):
        find_sites(torchvision.models.resnet18(), after="nosuchlayer*")
    with pytest.raises(CBAMInsertError, match="zzz"):
        find_sites(torchvision.models.resnet18(), after="block", include="zzz*")


def test_no_site_error_names_working_placements():
    with pytest.raises(CBAMInsertError, match="placements that find sites here: conv, stage"):
        insert_cbam(torchvision.models.vgg11(), after="block")


# ----------------------------------------------------------------------------- channel axis


def test_swin_adds_are_channels_last_not_sites():
    sites = find_sites(torchvision.models.swin_t(), after="block")
    assert len(sites) == 12 * 2 and not used(sites)
    assert all("channel axis is 3, not 1" in s.reason for s in sites)


def test_vit_has_no_site_and_says_token_layout():
    sites = find_sites(torchvision.models.vit_b_16(), after="block")
    assert sites and not used(sites)
    assert all("channel axis is 2, not 1" in s.reason for s in sites)
    with pytest.raises(CBAMInsertError, match="no site for after='block'"):
        insert_cbam(torchvision.models.vit_b_16(), after="block")


class _Tokens(nn.Module):
    """(N, L, D) tokens with L == D: a 3-D tensor whose dim 1 is not channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        t = self.conv(x).transpose(1, 2)  # (N, 16 positions, 16 features)
        return t + self.fc(t)


class _ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        return (y + self.fc(self.norm(y))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("model,shape", [(_Tokens(), (2, 16, 16)), (_ChannelsLast(), (2, 8, 8, 8))])
def test_never_inserts_where_dim1_is_not_channels(model, shape):
    sites = find_sites(model, after="block", example_inputs=(torch.randn(*shape),))
    assert len(sites) == 1 and not sites[0].used and "not 1" in sites[0].reason


# ----------------------------------------------------------------------------- residual branch


class _Block(nn.Module):
    def __init__(self, style, project=False):
        super().__init__()
        self.style = style
        self.branch = nn.Sequential(nn.Conv2d(8, 16 if project else 8, 3, padding=1), nn.BatchNorm2d(16 if project else 8), nn.ReLU(),
                                    nn.Conv2d(16 if project else 8, 16 if project else 8, 3, padding=1))  # fmt: skip
        self.shortcut = nn.Conv2d(8, 16, 1) if project else nn.Identity()

    def forward(self, x):
        b, s = self.branch(x), self.shortcut(x)
        if self.style == "plus":
            return s + b
        if self.style == "iadd":
            s += b
            return s
        if self.style == "torch.add":
            return torch.add(s, b)
        return s.add(b)


@pytest.mark.parametrize("style", ["plus", "iadd", "torch.add", "Tensor.add"])
@pytest.mark.parametrize("project", [False, True])
def test_cbam_goes_on_the_residual_branch(style, project):
    model = _Block(style, project)
    patched = insert_cbam(model, after="block", example_inputs=(torch.randn(2, 8, 16, 16),))
    (src,) = cbam_inputs(patched).values()
    assert src == "branch.3"  # the last conv of the branch, never the shortcut
    assert ("projection" if project else "identity") in used(patched.cbam_report.sites)[0].reason
    x = torch.randn(2, 8, 16, 16)
    patched.eval(), model.eval()
    out = patched(x)
    assert out.shape == model(x).shape


class _TopDown(nn.Module):
    """An FPN-style merge: the long path goes down a level and comes back up."""

    def __init__(self):
        super().__init__()
        self.lateral = nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.inner = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        top = F.interpolate(self.inner(self.down(x)), scale_factor=2.0)
        return self.lateral(x) + top


def test_top_down_merge_is_not_a_residual_block():
    sites = find_sites(_TopDown(), after="block", example_inputs=(torch.randn(1, 8, 16, 16),))
    assert len(sites) == 1 and not sites[0].used and "top-down" in sites[0].reason


# ----------------------------------------------------------------------------- keys, determinism, input untouched


def test_original_state_dict_keys_are_kept():
    model = torchvision.models.resnet18()
    patched = insert_cbam(model, after="conv")
    before, after = model.state_dict(), patched.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v)
    assert all("cbam" in k for k in set(after) - set(before))


def test_cbam_names_are_deterministic():
    a = insert_cbam(torchvision.models.resnet18(), after="conv")
    b = insert_cbam(torchvision.models.resnet18(), after="conv")
    assert list(a.state_dict()) == list(b.state_dict())
    assert a.cbam_report.modules[:3] == ["cbam_conv1", "layer1.0.cbam_conv1", "layer1.0.cbam_conv2"]


def test_input_model_is_untouched_unless_inplace():
    model = torchvision.models.resnet18()
    snapshot = copy.deepcopy(model.state_dict())
    find_sites(model, after="block")
    insert_cbam(model, after="block")
    assert not any(isinstance(m, CBAM) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())
    patched = insert_cbam(model, after="block", inplace=True)
    assert patched.layer1[0].conv1.weight is model.layer1[0].conv1.weight


# ----------------------------------------------------------------------------- train / eval


def test_googlenet_keeps_aux_outputs_in_train_and_logits_in_eval():
    model = torchvision.models.googlenet(weights=None, init_weights=False)
    patched = insert_cbam(model, after="conv")
    patched.train()
    out = patched(torch.randn(2, 3, 224, 224))
    assert type(out).__name__ == "GoogLeNetOutputs" and out.aux_logits1.shape == (2, 1000)
    patched.eval()
    out = patched(torch.randn(1, 3, 224, 224))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1000)


@pytest.mark.slow
def test_inception_v3_keeps_aux_outputs_in_train_and_logits_in_eval():
    model = torchvision.models.inception_v3(weights=None, init_weights=False)
    patched = insert_cbam(model, after="stage", example_inputs=(torch.randn(1, 3, 299, 299),))
    patched.train()
    out = patched(torch.randn(2, 3, 299, 299))
    assert type(out).__name__ == "InceptionOutputs" and out.aux_logits.shape == (2, 1000)
    patched.eval()
    assert isinstance(patched(torch.randn(1, 3, 299, 299)), torch.Tensor)


def test_dropout_stays_active_in_train_only():
    patched = insert_cbam(torchvision.models.mobilenet_v2(), after="block", init="identity")
    x = torch.randn(2, 3, 64, 64)
    patched.train()
    assert not torch.equal(patched(x), patched(x))
    patched.eval()
    assert torch.equal(patched(x), patched(x))


# ----------------------------------------------------------------------------- untraceable models


@pytest.mark.slow
def test_fasterrcnn_backbone_gets_16_bottlenecks_and_still_detects():
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    patched = insert_cbam(model, after="block")
    assert type(patched) is type(model) and hasattr(patched, "transform")
    report = patched.cbam_report
    assert len(report.modules) == 16 and all(m.startswith("backbone.body.layer") for m in report.modules)
    assert any(path == "" for path, _ in report.untraced) and "backbone" in report.traced
    assert sum("top-down" in s.reason for s in report.sites) == 3  # the FPN merges
    patched.eval()
    out = patched([torch.rand(3, 96, 128), torch.rand(3, 80, 80)])
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    assert not any(isinstance(m, CBAM) for m in model.modules())


# ----------------------------------------------------------------------------- re-patching


def test_repatching_does_not_stack_unless_asked():
    patched = insert_cbam(torchvision.models.resnet18(), after="block")
    sites = find_sites(patched, after="block")
    assert not used(sites) and all("already has CBAM" in s.reason for s in sites)
    with pytest.raises(CBAMInsertError, match="already has CBAM"):
        insert_cbam(patched, after="block")
    twice = insert_cbam(patched, after="block", allow_repatch=True)
    assert sum(isinstance(m, CBAM) for m in twice.modules()) == 16
    assert twice.cbam_report.modules[0] == "layer1.0.cbam_add_2"
    assert len(twice.cbam_recipe["steps"]) == 2


# ----------------------------------------------------------------------------- numerics, dtype, device


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_b0"])
def test_identity_init_reproduces_outputs_and_backward_works(name):
    model = torchvision.models.get_model(name, weights=None).eval()
    patched = insert_cbam(model, after="block", init="identity").eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    out = patched(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    out.sum().backward()
    gammas = [m.gamma.grad for m in patched.modules() if isinstance(m, CBAM)]
    assert all(g is not None for g in gammas) and any(g.abs().sum() > 0 for g in gammas)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cbam_takes_the_dtype_of_the_feature_map(dtype):
    model = torchvision.models.resnet18().to(dtype)
    patched = insert_cbam(model, after="stage")
    assert all(p.dtype == dtype for m in patched.modules() if isinstance(m, CBAM) for p in m.parameters())
    out = patched.eval()(torch.randn(1, 3, 64, 64, dtype=dtype))
    assert out.dtype == dtype


def test_example_inputs_are_inferred_for_1d_2d_3d():
    net1d = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
    net3d = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU())
    s1 = used(find_sites(net1d, after="conv"))[0]
    s3 = used(find_sites(net3d, after="conv"))[0]
    assert len(s1.shape) == 3 and len(s3.shape) == 5
    p1 = insert_cbam(net1d, after="conv")
    p3 = insert_cbam(net3d, after="conv")
    assert p1(torch.randn(2, 4, 32)).shape == (2, 8, 32)
    assert p3(torch.randn(1, 3, 4, 8, 8)).shape == (1, 8, 4, 8, 8)
    with pytest.raises(CBAMInsertError, match="example_inputs"):
        find_sites(nn.Sequential(nn.Linear(4, 4)), after="conv")


def test_official_variant_on_resnet50_has_the_papers_parameter_count():
    """Woo et al. report 28.09 M parameters for ResNet-50 + CBAM (Table 4); the authors' module
    (MLP biases, BatchNorm after the spatial conv) in every bottleneck gives exactly that."""
    model = torchvision.models.resnet50()
    official = insert_cbam(model, after="block", variant="official")
    plain = insert_cbam(model, after="block")
    assert round(sum(p.numel() for p in official.parameters()) / 1e6, 2) == 28.09
    # the plain variant's bias-free module: 2*C*(C//16) + 2*7*7 per block, C = 256/512/1024/2048 x 3/4/6/3
    expected = sum(n * (2 * c * (c // 16) + 98) for c, n in [(256, 3), (512, 4), (1024, 6), (2048, 3)])
    assert sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in model.parameters()) == expected


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.width = 8  # a plain attribute the parent reads, as RAFT reads update_block.hidden_state_size
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        if x.sum() > float("inf"):  # data-dependent control flow: FX cannot trace this
            return x
        return self.inner(x)[:, : self.inner.width]


def test_patched_submodules_keep_their_plain_attributes():
    patched = insert_cbam(_Untraceable(), after="block", example_inputs=(torch.randn(1, 8, 8, 8),))
    assert patched.cbam_report.modules == ["inner.cbam_add"]
    assert patched.inner.width == 8
    assert patched(torch.randn(1, 8, 8, 8)).shape == (1, 8, 8, 8)


# ----------------------------------------------------------------------------- input reuse


def reuse_flags(model):
    return {n: m.reuse_input for n, m in model.named_modules() if isinstance(m, CBAM)}


@pytest.mark.parametrize(
    ("name", "after"),
    [("resnet50", "block"), ("resnet18", "conv"), ("mobilenet_v2", "block"), ("efficientnet_b0", "block"),
     ("convnext_tiny", "block")],
)  # fmt: skip
def test_sites_whose_tensor_nothing_else_reads_reuse_it_and_give_the_same_output(name, after):
    model = torchvision.models.get_model(name, weights=None).eval()
    patched = insert_cbam(model, after=after)
    plain = insert_cbam(model, after=after, reuse_input=False)
    plain.load_state_dict(patched.state_dict())
    assert all(reuse_flags(patched).values()) and not any(reuse_flags(plain).values())
    x = torch.randn(2, 3, 64, 64)
    before = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(patched(x), plain(x), atol=0, rtol=0)
    assert torch.equal(x, before)
    assert patched.cbam_recipe["steps"][0]["reuse_input"] is True


class _Branch(nn.Module):
    """conv -> bn -> (ReLU in place) feeding ``site``; ``also_read`` makes a second reader."""

    def __init__(self, also_read=False, head=None):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.head = head if head is not None else nn.Identity()
        self.site = nn.Conv2d(8, 8, 1)
        self.also_read = also_read

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.site(self.head(self.act(y)))
        return z + y if self.also_read else z


class _View(nn.Module):
    def forward(self, x):
        return x[:, :]


@pytest.mark.parametrize(
    ("model", "after", "reused"),
    [
        (_Branch(), "act", True),  # ReLU(inplace) after a batch norm: fresh, one reader
        (_Branch(), "head", True),  # through Identity and the in-place ReLU
        (_Branch(also_read=True), "head", False),  # the ReLU's input, which it aliases, is read again
        (_Branch(head=_View()), "head", False),  # made by a module we do not know: may be a view
        (nn.Sequential(nn.Identity(), nn.Conv2d(3, 8, 1)), "0", False),  # the model's input itself
    ],
    ids=["after-relu", "through-identity", "second-reader", "unknown-module", "model-input"],
)
def test_reuse_only_where_the_tensor_is_fresh_and_read_once(model, after, reused):
    model.eval()
    channels = 3 if isinstance(model, nn.Sequential) else 8
    patched = insert_cbam(model, after=after, example_inputs=torch.randn(1, channels, 8, 8))
    assert list(reuse_flags(patched).values()) == [reused]
    plain = insert_cbam(model, after=after, reuse_input=False, example_inputs=torch.randn(1, channels, 8, 8))
    plain.load_state_dict(patched.state_dict())
    x = torch.randn(2, channels, 8, 8)
    before = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), plain(x), atol=0, rtol=0)
    assert torch.equal(x, before)


def test_a_hook_on_the_producing_module_turns_reuse_off():
    model = _Branch().eval()
    model.bn.register_forward_hook(lambda m, a, out: None)
    model.act = nn.Identity()
    patched = insert_cbam(model, after="act", example_inputs=torch.randn(1, 8, 8, 8))
    assert list(reuse_flags(patched).values()) == [False]


def test_reuse_input_is_replayed_from_the_recipe_and_checked():
    from cbam_insert import apply_recipe

    model = torchvision.models.resnet18()
    patched = insert_cbam(model, after="block", reuse_input=False)
    again = apply_recipe(torchvision.models.resnet18(), patched.cbam_recipe)
    assert not any(reuse_flags(again).values())
    with pytest.raises(CBAMInsertError, match="reuse_input"):
        insert_cbam(model, after="block", reuse_input="yes")
