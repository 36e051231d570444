"""Property tests: the patch keeps its contract on random small CNNs (see ``_randnets``).

For every placement and every generated architecture, with an attention module drawn from the
registry (CBAM most often): the patch either succeeds or refuses with
``CBAMInsertError``; conv and block sites are exactly the ones an independent eager oracle
predicts; CBAM sits on the residual branch, never on the shortcut; output shapes are kept;
identity init is exact in eval and train mode; backward reaches every CBAM parameter; patching the
result again adds nothing; the input model is untouched; and the state dict + recipe and pt round
trips give back equal outputs.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _randnets import ConvNeXtBlock, RandNet, ResBlock, spec_strategy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cbam_insert import (
    ATTENTION,
    CBAMInsertError,
    apply_recipe,
    find_sites,
    insert_attention,
    insert_cbam,
    load_model,
    save_model,
)
from cbam_insert.attention import is_attention, rank_refusal

EXAMPLES_PER_PLACEMENT = 70  # x 3 placements: 210 generated architectures per run

_SETTINGS = settings(
    max_examples=EXAMPLES_PER_PLACEMENT,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _spatial(t: torch.Tensor) -> bool:
    return math.prod(t.shape[2:]) > 1


def _expected_sites(model: nn.Module, x: torch.Tensor, after: str) -> dict[str, str] | None:
    """What an eager run says the sites are: {block module: residual branch end} for ``block``,
    {conv module path: ""} for ``conv``; ``None`` where there is no oracle (``stage``).

    A site is a map with a spatial extent: 1x1 maps are global descriptors, never sites. Residual
    adds in the channels-last layout (``ChannelsLastBlock``) and top-down merges are not sites.
    """
    if after == "stage":
        return None
    found: dict[str, str] = {}

    def record(name: str, value: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: object, out: torch.Tensor) -> None:
            if _spatial(out):
                found[name] = value

        return hook

    handles = []
    for name, mod in model.named_modules():
        if after == "conv" and isinstance(mod, nn.modules.conv._ConvNd) and mod.out_channels > 1:  # one channel: skipped
            handles.append(mod.register_forward_hook(record(name, "")))
        if after == "block" and isinstance(mod, ResBlock):
            handles.append(mod.register_forward_hook(record(name, f"{name}.branch.{len(mod.branch) - 1}.norm")))
        if after == "block" and isinstance(mod, ConvNeXtBlock):  # the branch ends with the permute back
            handles.append(mod.register_forward_hook(record(name, f"{name}.permute:1")))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


def _outputs(model: nn.Module, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("after", ["conv", "block", "stage"])
@_SETTINGS
@given(spec=spec_strategy(), module=st.sampled_from(["cbam", "cbam", *sorted(set(ATTENTION) - {"cbam"})]))
def test_patch_keeps_its_contract_on_random_cnns(after: str, spec: dict, module: str) -> None:
    torch.manual_seed(0)
    model = RandNet(spec).eval()
    x = model.example_input()
    before = _state(model)
    expected = _expected_sites(model, x, after)
    refused_rank = rank_refusal(module, spec["dims"])
    try:
        patched = insert_attention(model, after=after, example_inputs=(x,), module=module, init="identity", seed=0)
    except CBAMInsertError as exc:
        assert "no site" in str(exc)
        assert not expected or refused_rank, f"refused although the oracle finds {sorted(expected or {})}: {exc}"
        return
    assert refused_rank is None, f"{module} patched a {spec['dims']}-D model it refuses"
    report = patched.cbam_report
    cbams = [n for n, m in patched.named_modules() if is_attention(m)]
    assert all(type(patched.get_submodule(n)) is ATTENTION[module] for n in cbams)
    assert sorted(cbams) == sorted(report.modules) and len(cbams) == len(report.used) > 0

    if after == "conv":
        assert sorted(s.name for s in report.used) == sorted(expected)
    if after == "block":
        got = {s.name.rpartition(".")[0]: s.operand for s in report.used}
        assert got == expected, "CBAM must sit on the residual branch (its last node), one per residual block"
        assert all(s.reason.startswith("residual branch") for s in report.used)

    # patching the result again, with CBAM, is refused: every site already has an attention module
    with pytest.raises(CBAMInsertError, match="no site"):
        insert_cbam(patched, after=after, example_inputs=(x,))

    # the input model is untouched
    after_state = model.state_dict()
    assert before.keys() == after_state.keys() and all(torch.equal(before[k], after_state[k]) for k in before)

    # identity init: same outputs (and shapes) in eval mode, and in train mode (batch statistics)
    ref = _outputs(model, x)
    out = _outputs(patched, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    ref_train = _outputs(copy.deepcopy(model), x, train=True)
    out_train = _outputs(copy.deepcopy(patched), x, train=True)
    torch.testing.assert_close(out_train, ref_train, atol=1e-5, rtol=0)

    # backward works in both modes and reaches every CBAM parameter (the values may be 0 on
    # these tiny nets: a ReLU map that is all zeros, a batch norm over two values)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    for train in (True, False):
        patched.train(train)
        patched.zero_grad()
        (patched(x) * weight).sum().backward()
        grads = [p.grad for n in cbams for p in patched.get_submodule(n).parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    # make CBAM matter, then rebuild from state dict + recipe on a fresh copy of the architecture
    with torch.no_grad():
        for n in cbams:
            for p in patched.get_submodule(n).parameters():
                p.add_(torch.randn_like(p) * 0.3 + 0.5)
    patched.eval()
    want = _outputs(patched, x)
    torch.manual_seed(1)
    recipe = json.loads(json.dumps(patched.cbam_recipe))
    rebuilt = apply_recipe(RandNet(spec), recipe)
    rebuilt.load_state_dict(patched.state_dict())
    assert sorted(n for n, m in rebuilt.named_modules() if is_attention(m)) == sorted(cbams)
    torch.testing.assert_close(_outputs(rebuilt, x), want, atol=1e-6, rtol=0)

    # pt round trip through the package's own (safe) loader
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(patched, Path(tmp) / "patched.pt")
        loaded = load_model(path)
    torch.testing.assert_close(_outputs(loaded, x), want, atol=1e-6, rtol=0)


def test_top_down_merge_through_a_one_pixel_level_is_not_a_residual_block() -> None:
    """Regression: a level pooled to 1 pixel and upsampled back (an FPN on a small input) is a
    top-down merge, not a squeeze-and-excitation gate on a residual branch."""
    spec = {"dims": 1, "in_ch": 1, "size": [3], "head": "map", "layers": [
        ["conv", {"out": 1, "k": 3, "stride": 1, "norm": "bn", "act": "relu"}],
        ["res", {"out": 1, "stride": 2, "n_units": 2, "merge": "plus", "branch_first": False, "proj": True, "post_act": False}],
        ["topdown", {}],
    ]}  # fmt: skip
    model = RandNet(spec).eval()
    sites = {s.name: s for s in find_sites(model, "block", (model.example_input(),))}
    assert sites["layers.1.add"].used and sites["layers.1.add"].operand == "layers.1.branch.1.norm"
    assert not sites["layers.2.add"].used and sites["layers.2.add"].reason.startswith("top-down merge")


def test_convnext_block_wider_than_its_channels_is_a_residual_block() -> None:
    """Regression: the permute back from channels-last (N, H, W, C), with C < W, is not an upsample."""
    spec = {"dims": 2, "in_ch": 2, "size": [4, 4], "head": "map", "layers": [
        ["conv", {"out": 3, "k": 3, "stride": 1, "norm": "bn", "act": "relu"}],
        ["convnext", {}],
        ["channels_last", {}],
    ]}  # fmt: skip
    model = RandNet(spec).eval()
    sites = {s.name: s for s in find_sites(model, "block", (model.example_input(),))}
    assert sites["layers.1.add"].used and sites["layers.1.add"].operand == "layers.1.permute:1"
    assert not sites["layers.2.add"].used and "channel axis is 3" in sites["layers.2.add"].reason
