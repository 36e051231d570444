"""Crafted model files against the loader (issue #17; docs/security.md has the threat model).

Each hole class has at least one file built here (nothing binary is checked in). The CLI runs on
every file in a fresh process with a time limit; each run must leave no marker file, exit 1 with one
``error:`` line and no control characters, in under ``TIME_LIMIT_S`` and under ``MEMORY_LIMIT_MB``
above the process's own baseline. ``load_model`` is also called in-process on each, and may raise
only ``CBAMInsertError``. A fuzz test mutates valid files for a bounded time.
"""

from __future__ import annotations

import collections
import copyreg
import functools
import json
import os
import random
import re
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from _adversary import (
    NewObj,
    Reduce,
    child_env,
    install_evilpkg,
    module_state,
    op_global,
    op_int,
    op_str,
    replace_pickle,
    run_batch,
    run_measured,
    write_archive,
    write_shadow,
)
from torch import nn

from cbam_insert import CBAMInsertError, insert_cbam, load_model, save_model

TIME_LIMIT_S = 20
MEMORY_LIMIT_MB = 1536
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b\u202a-\u202e\u2066-\u2069]")


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())  # fmt: skip


X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """``evilpkg`` installed in a site directory, importable here too (to pickle references to it)."""
    site = install_evilpkg(tmp_path_factory.mktemp("site"))
    sys.path.insert(1, str(site))
    import importlib

    importlib.invalidate_caches()
    import evilpkg

    yield site, evilpkg
    sys.path.remove(str(site))
    for name in [m for m in sys.modules if m == "evilpkg" or m.startswith("evilpkg.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


def _tool_pt(path: Path, *, recipe_edit=None, base_edit=None, state_edit=None) -> Path:
    """This tool's own ``.pt`` of a small patched net, with parts of it replaced."""
    from cbam_insert import patched as patched_format
    from cbam_insert.unpickle import read_untrusted

    model = insert_cbam(small_net(), after="conv", example_inputs=(X,), seed=0)
    save_model(model, path)
    obj = read_untrusted(path).obj  # the payload of rebuild(payload), read without running it
    recipe = json.loads(obj["recipe"])
    if recipe_edit is not None:
        recipe = recipe_edit(recipe)
    obj["recipe"] = recipe if isinstance(recipe, str) else json.dumps(recipe)
    if base_edit is not None:
        base_edit(obj["base"])
    if state_edit is not None:
        state_edit(obj["state_dict"])
    torch.save(patched_format.wrap(obj), path)
    return path


def _step(recipe, **fields):
    recipe["steps"][0].update(fields)
    return recipe


def _nested_list(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


# ----------------------------------------------------------------------------- the crafted files
# name -> (hole class, builder(path, evilpkg, marker), what must happen: "refused" or "loads")
# "loads": the file is harmless once its recipe replays the recorded site names (the pattern never runs).


def _cases():
    c = {}

    def case(name, hole, expect="refused"):
        def deco(fn):
            c[name] = (hole, fn, expect)
            return fn

        return deco

    # 1. constructor calls through torch's own rebuild helpers ---------------------------------
    @case("rebuild_from_type_calls_a_module_class", 1)
    def _(p, ev, m):
        net = small_net()
        net.payload = Reduce(torch._tensor._rebuild_from_type_v2, (ev.Net, torch.Tensor, (str(m),), {}))
        torch.save(net, p)

    @case("rebuild_from_type_to_a_module_type", 1)
    def _(p, ev, m):
        net = small_net()
        net.payload = Reduce(torch._tensor._rebuild_from_type_v2,
                             (torch._utils._rebuild_meta_tensor_no_storage, ev.Net, (torch.float32, (1,), (1,), False), {}))  # fmt: skip
        torch.save(net, p)

    @case("reduce_calls_a_module_class", 1)
    def _(p, ev, m):
        net = small_net()
        net.payload = Reduce(ev.Net, (str(m),))
        torch.save(net, p)

    @case("parameter_state_holds_a_function", 1)
    def _(p, ev, m):
        net = small_net()
        net.payload = Reduce(torch._utils._rebuild_parameter_with_state,
                             (torch.zeros(2), False, collections.OrderedDict(), {"fn": ev.touch}))  # fmt: skip
        torch.save(net, p)

    @case("enum_missing_hook", 1)
    def _(p, ev, m):
        net = small_net()
        net.payload = Reduce(ev.Ev, ("not-a-member",))
        torch.save(net, p)

    @case("reconstructor_with_a_builtin_base", 1)
    def _(p, ev, m):
        net = small_net()
        net.payload = Reduce(copyreg._reconstructor, (ev.Plain, int, 5))
        torch.save(net, p)

    # 2. restoring runs the class's own code --------------------------------------------------
    @case("optimized_module_setstate", 2)
    def _(p, ev, m):
        from torch._dynamo.eval_frame import OptimizedModule

        state = module_state(_orig_mod=small_net(), dynamo_ctx=functools.partial(ev.Net, str(m)))
        torch.save(NewObj(OptimizedModule, state), p)

    @case("module_with_own_setstate", 2)
    def _(p, ev, m):
        net = small_net()
        net._modules["extra"] = NewObj(ev.Hooked, module_state())
        torch.save(net, p)

    @case("module_with_own_setattr", 2)
    def _(p, ev, m):
        torch.save(NewObj(ev.SetAttr, module_state()), p)

    @case("module_with_own_reduce_ex", 2)
    def _(p, ev, m):
        torch.save(NewObj(ev.Copier, module_state()), p)

    @case("data_class_with_own_setstate", 2)
    def _(p, ev, m):
        net = small_net()
        net.cfg = NewObj(ev.Cfg, {"a": 1})
        torch.save(net, p)

    @case("data_class_with_a_finalizer", 2)
    def _(p, ev, m):
        net = small_net()
        net.cfg = NewObj(ev.Finalized, {"a": 1})
        torch.save(net, p)

    @case("object_with_own_hash_as_a_key", 2)
    def _(p, ev, m):
        net = small_net()
        net.table = {NewObj(ev.Hashy, {"a": 1}): 1}
        torch.save(net, p)

    @case("graph_module", 2)
    def _(p, ev, m):
        torch.save(torch.fx.symbolic_trace(small_net()), p)

    # 3. callables stored where the model calls them -------------------------------------------
    @case("partial_in_place_of_a_child", 3)
    def _(p, ev, m):
        net = small_net()
        net._modules["0"] = functools.partial(ev.Net, str(m))
        torch.save(net, p)

    @case("partial_as_an_attribute", 3)
    def _(p, ev, m):
        net = small_net()
        net.__dict__["forward"] = functools.partial(ev.Net, str(m))
        torch.save(net, p)

    @case("newobj_partial_of_a_function", 3)
    def _(p, ev, m):
        import torchvision.ops

        net = small_net()
        net.iou = NewObj(functools.partial, (torchvision.ops.box_iou, (), {}, None), args=(torchvision.ops.box_iou,))
        net.maker = NewObj(functools.partial, (set, (), {}, None), args=(set,))
        torch.save(net, p)

    @case("partial_of_a_norm_layer_with_a_huge_size", 3)
    def _(p, ev, m):
        net = small_net()
        net.norm = functools.partial(nn.BatchNorm2d, 1 << 34)
        torch.save(net, p)

    @case("function_as_an_attribute", 3)
    def _(p, ev, m):
        net = small_net()
        net.act = ev.touch
        torch.save(net, p)

    @case("class_as_an_attribute", 3)
    def _(p, ev, m):
        net = small_net()
        net.factory = ev.Net
        torch.save(net, p)

    @case("callable_instance", 3)
    def _(p, ev, m):
        net = small_net()
        net.helper = NewObj(ev.Caller, {})
        torch.save(net, p)

    @case("forward_hook", 3)
    def _(p, ev, m):
        net = small_net()
        net._forward_hooks[0] = ev.touch
        torch.save(net, p)

    @case("module_instance_as_a_forward_hook", 3)
    def _(p, ev, m):
        net = small_net()
        net._forward_hooks[0] = NewObj(ev.Net, module_state())
        torch.save(net, p)

    # 4. imports -------------------------------------------------------------------------------
    @case("alias_of_a_stdlib_function", 4)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + op_global("evilpkg", "system") + op_str(f"touch {m}") + b"\x85R.")

    @case("main_module", 4)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + op_global("evilpkg.__main__", "X") + b")\x81}b.")

    @case("refused_file_imports_nothing", 4)
    def _(p, ev, m):
        pkl = (b"\x80\x02" + op_global("evilpkg.sideeffect", "Thing") + b")\x81}b"
               + op_global("os", "system") + op_str("true") + b"\x85R\x86.")  # fmt: skip
        write_archive(p, pkl)

    @case("not_installed_module", 4)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + op_global("localmod", "Net") + b")\x81}b.")

    @case("stdlib_class", 4)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + op_global("argparse", "Namespace") + b")\x81}b.")

    # 5. resources -----------------------------------------------------------------------------
    @case("bytearray_of_4_gib", 5)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + op_global("__builtin__", "bytearray") + op_int(4 << 30) + b"\x85R.")

    @case("meta_parameter_of_4_gib_in_a_tool_file", 5)
    def _(p, ev, m):
        _tool_pt(p, base_edit=lambda b: b.register_parameter("big", nn.Parameter(torch.empty(1 << 30, device="meta"))))

    @case("meta_parameter_of_1_tib_in_a_tool_file", 5)
    def _(p, ev, m):
        _tool_pt(p, base_edit=lambda b: b.register_parameter("big", nn.Parameter(torch.empty(1 << 38, device="meta"))))

    @case("conv_claims_20000_input_channels", 5)
    def _(p, ev, m):
        net = small_net()
        net[0].in_channels = 20000
        torch.save(net, p)

    @case("recipe_hidden_width_huge", 5)
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: _step(r, options={"hidden": 1 << 30}))

    @case("recipe_kernel_huge", 5)
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: _step(r, options={"kernel_size": 4001}))

    @case("recipe_regex_backtracks", 5, "loads")
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: _step(r, after="re:(?:.*){14}X"))

    @case("recipe_include_regex_backtracks", 5, "loads")
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: _step(r, selection=dict(r["steps"][0]["selection"], include=["(a*)*b"])))

    @case("recipe_with_60_steps", 5)
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: dict(r, steps=r["steps"] * 60))

    @case("recipe_example_input_too_large", 5)
    def _(p, ev, m):
        _tool_pt(
            p,
            recipe_edit=lambda r: _step(
                r, example_inputs={"tuple": [{"shape": [64, 3, 1024, 1024], "dtype": "float32"}]}
            ),
        )

    @case("pickle_deflates_to_256_mb", 5)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + b"N0" * (128 << 20) + b"N.", deflate_pickle=True)

    @case("storage_claims_more_than_stored", 5)
    def _(p, ev, m):
        pkl = (b"\x80\x02" + op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + b"(" + op_str("storage")
               + op_global("torch", "FloatStorage") + op_str("0") + op_str("cpu") + op_int(1 << 34) + b"tQ"
               + op_int(0) + op_int(1 << 34) + b"\x85" + op_int(1) + b"\x85" + b"\x89" + b"}tR.")  # fmt: skip
        write_archive(p, pkl, {"0": b"\0" * 16})

    @case("storage_deflated", 5)
    def _(p, ev, m):
        pkl = (b"\x80\x02" + op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + b"(" + op_str("storage")
               + op_global("torch", "FloatStorage") + op_str("0") + op_str("cpu") + op_int(1 << 24) + b"tQ"
               + op_int(0) + op_int(1 << 24) + b"\x85" + op_int(1) + b"\x85" + b"\x89" + b"}tR.")  # fmt: skip
        write_archive(p, pkl, {"0": b"\0" * (1 << 26)}, deflate_storages=True)

    @case("tensor_view_larger_than_its_storage", 5)
    def _(p, ev, m):
        pkl = (b"\x80\x02" + op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + b"(" + op_str("storage")
               + op_global("torch", "FloatStorage") + op_str("0") + op_str("cpu") + op_int(4) + b"tQ"
               + op_int(0) + op_int(1 << 32) + op_int(1 << 4) + b"\x86" + op_int(0) + op_int(0) + b"\x86"
               + b"\x89" + b"}tR.")  # fmt: skip
        write_archive(p, pkl, {"0": b"\0" * 16})

    @case("too_many_opcodes", 5)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + b"N0" * 2_500_000 + b"N.")

    @case("huge_integer", 5)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + op_int(1 << 80_000) + b".")

    @case("list_nested_20000_deep", 5)
    def _(p, ev, m):
        write_archive(p, _nested_list(20000))

    @case("recipe_json_nested_100000_deep", 5)
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: "[" * 100_000 + "]" * 100_000)

    # 6. output and contract -------------------------------------------------------------------
    @case("escape_sequence_in_a_global_name", 6)
    def _(p, ev, m):
        write_archive(p, b"\x80\x02" + op_global("evilpkg", "\x1b[32msaved\x1b]0;pwned\x07") + b")\x81}b.")

    @case("escape_sequence_in_a_module_name", 6)
    def _(p, ev, m):
        net = small_net()
        net._modules["\x1b[2J\x1b[32mok"] = nn.ReLU()
        torch.save(net, p)

    @case("recipe_bad_regex", 6)
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: _step(r, after="re:("))

    @case("recipe_seed_too_large", 6)
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: _step(r, seed=2**70))

    @case("recipe_quantized_dtype", 6)
    def _(p, ev, m):
        _tool_pt(
            p, recipe_edit=lambda r: _step(r, example_inputs={"tuple": [{"shape": [1, 3, 32, 32], "dtype": "quint8"}]})
        )

    @case("recipe_include_not_a_string", 6)
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: _step(r, selection=dict(r["steps"][0]["selection"], include=[1])))

    @case("recipe_escape_sequence", 6)
    def _(p, ev, m):
        _tool_pt(p, recipe_edit=lambda r: _step(r, after="\x1b]0;pwned\x07conv", modules=["\x1b[31mx"]))

    @case("truncated", 6)
    def _(p, ev, m):
        torch.save(small_net(), p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    return c


CASES = _cases()


def _build(name, evil, work, marker):
    _, ev = evil
    path = work / f"{name}.pt"
    CASES[name][1](path, ev, marker)
    return path


@pytest.fixture(scope="module")
def batch(evil, work):
    """Every crafted file through the CLI, in one fresh process after importing it once."""
    site, _ = evil
    marker = work / "marker"
    cwd = work / "cwd"
    cwd.mkdir()
    cases = []
    for name in CASES:
        path = _build(name, evil, work, marker)
        cases.append((name, [str(path), "--dry-run", "--after", "conv"], cwd))
    base, results, run = run_batch(cases, site=site, marker=marker, work=work, limit_s=TIME_LIMIT_S)
    return base, {r["name"]: r for r in results}, run, marker


@pytest.mark.parametrize("name", sorted(CASES))
def test_crafted_file_is_refused_by_the_cli(batch, name):
    base, results, run, marker = batch
    assert name in results, f"the batch process died before {name}: rc={run.rc} {run.stderr[-2000:]}"
    r = results[name]
    assert not marker.exists(), f"{name} ran code from the file"
    if CASES[name][2] == "loads":
        assert r["rc"] == 0 and "error" not in r["stderr"], f"{name}: exit {r['rc']}: {r['stderr'][-500:]}"
    else:
        assert r["rc"] == 1, f"{name}: exit {r['rc']}: {r['stderr'][-500:]}"
        lines = r["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    assert not CONTROL.search(r["stderr"] + r["stdout"]), repr(r["stderr"])
    assert "internal error" not in r["stderr"]
    assert r["wall_s"] < TIME_LIMIT_S, f"{name} took {r['wall_s']:.1f} s"
    assert r["peak_mb"] - base < MEMORY_LIMIT_MB, f"{name} peaked at {r['peak_mb']:.0f} MB (baseline {base:.0f} MB)"


def test_the_suite_prints_its_figures(batch):
    """Not an assertion on speed: the figures go to the report (``pytest -s`` shows them)."""
    base, results, run, _ = batch
    slowest = max(results.values(), key=lambda r: r["wall_s"])
    print(f"\nadversarial suite: {len(results)} files, process wall {run.wall_s:.1f} s, baseline {base:.0f} MB, "
          f"peak {run.peak_mb:.0f} MB (+{run.peak_mb - base:.0f} MB); slowest {slowest['name']} {slowest['wall_s']:.2f} s")  # fmt: skip
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["wall_s"])[:5]:
        print(f"  {name}: {r['wall_s']:.2f} s, high-water {r['peak_mb']:.0f} MB")
    previous = base
    for r in results.values():  # in run order: where the high-water mark rose
        if r["peak_mb"] > previous + 20:
            print(f"  high-water +{r['peak_mb'] - previous:.0f} MB at {r['name']}")
        previous = r["peak_mb"]
    assert len(results) == len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_model_raises_only_cbam_insert_error(evil, work, name, tmp_path):
    marker = tmp_path / "marker"
    path = _build(name, evil, tmp_path, marker)
    if CASES[name][2] == "loads":
        assert isinstance(load_model(path), nn.Module) and not marker.exists()
        return
    with pytest.raises(CBAMInsertError) as info:
        load_model(path)
    assert not marker.exists()
    assert "\n" not in str(info.value) and not CONTROL.search(str(info.value))


def test_every_hole_class_has_files():
    holes = collections.Counter(h for h, _, _ in CASES.values())
    assert sorted(holes) == [1, 2, 3, 4, 5, 6] and min(holes.values()) >= 3


# ----------------------------------------------------------------------------- imports, one process each


def test_a_package_in_the_working_directory_is_never_imported(evil, tmp_path):
    """``python -m cbam_insert`` puts the cwd first on sys.path: a same-named package there must not
    shadow the installed one, and a module only the cwd has is refused without importing it."""
    site, ev = evil
    marker = tmp_path / "marker"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    write_shadow(cwd)
    only_here = write_archive(
        tmp_path / "only_here.pt", b"\x80\x02" + op_global("evilpkg.shadowonly", "Thing") + b")\x81}b."
    )
    local = write_archive(tmp_path / "local.pt", b"\x80\x02" + op_global("localmod", "Net") + b")\x81}b.")
    legit = tmp_path / "legit.pt"
    torch.save(nn.Sequential(NewObj(ev.Net, module_state()), nn.Conv2d(3, 4, 3)), legit)
    env = child_env(site, marker)
    for path in (only_here, local):
        r = run_measured([sys.executable, "-m", "cbam_insert", str(path), "--dry-run"], cwd=cwd, env=env, timeout=60)
        assert r.rc == 1 and not marker.exists(), (r.rc, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    code = f"from cbam_insert import load_model; m = load_model({str(legit)!r}); print(type(m[0]).__module__, type(m[0]).__name__)"
    r = run_measured([sys.executable, "-c", code], cwd=cwd, env=env, timeout=60)
    assert r.rc == 0, r.stderr
    assert r.stdout.split() == ["evilpkg", "Net"] and not marker.exists()  # the installed evilpkg, restored, not run


def test_a_main_module_reading_stdin_is_never_imported(evil, tmp_path):
    site, _ = evil
    marker = tmp_path / "marker"
    path = write_archive(tmp_path / "m.pt", b"\x80\x02" + op_global("evilpkg.__main__", "X") + b")\x81}b.")
    read, write = os.pipe()  # stdin that never ends: a module reading it would hang
    try:
        r = run_measured([sys.executable, "-m", "cbam_insert", str(path), "--json", "--dry-run"], cwd=tmp_path,
                         env=child_env(site, marker), timeout=60, stdin=read)  # fmt: skip
    finally:
        os.close(read)
        os.close(write)
    assert r.rc == 1 and not marker.exists(), (r.rc, r.stderr)
    assert set(json.loads(r.stdout)) == {"error", "exit_code"}  # --json reports the error, nothing from stdin


@pytest.mark.slow
def test_ultralytics_detection_model_is_not_constructed(tmp_path):
    """The reported payload: DetectionModel(cfg) eval()s cfg['activation']; through _rebuild_from_type_v2."""
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    marker = tmp_path / "marker"
    cfg = {"activation": f"__import__('pathlib').Path({str(marker)!r}).touch() or None", "nc": 1,
           "backbone": [], "head": []}  # fmt: skip
    net = small_net()
    net.payload = Reduce(torch._tensor._rebuild_from_type_v2, (DetectionModel, torch.Tensor, (cfg,), {}))
    torch.save(net, tmp_path / "y.pt")
    env = child_env(tmp_path, marker)
    r = run_measured([sys.executable, "-m", "cbam_insert", str(tmp_path / "y.pt"), "--dry-run"], cwd=tmp_path, env=env)
    assert r.rc == 1 and not marker.exists(), r.stderr
    assert "DetectionModel" not in r.stdout and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- what must keep loading


def test_a_planted_cbam_base_is_not_trusted(tmp_path):
    net = small_net().eval()
    other = nn.Sequential(nn.Conv2d(3, 8, 1))
    net.__dict__["_cbam_base"] = other
    net.cbam_recipe = {"format": "cbam-insert/recipe", "version": 1, "steps": []}
    torch.save(net, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert "_cbam_base" not in loaded.__dict__ and not hasattr(loaded, "cbam_recipe")
    patched = insert_cbam(loaded, after="conv", example_inputs=(X,), seed=0)
    save_model(patched, tmp_path / "out.pt")
    again = load_model(tmp_path / "out.pt").eval()
    with torch.no_grad():
        assert torch.equal(again(X), patched.eval()(X))
    first = again.get_submodule("0")
    assert (
        isinstance(first, nn.Conv2d) and first.in_channels == 3 and first.kernel_size == (3, 3)
    )  # not the planted 1x1


def test_restored_classes_and_reviewed_values_still_load(evil, tmp_path):
    """Data-only classes of a library, enums, named tuples, norm partials and a state dict's metadata."""
    _, ev = evil
    net = small_net().eval()
    net.cfg = NewObj(ev.Plain, {"depth": 3, "name": "x"})
    net.mode = ev.Ev.A
    net.norm_layer = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
    net.act_layer = nn.ReLU
    net.shape = torch.Size([2, 3])
    torch.save(net, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt").eval()
    assert type(loaded.cfg) is ev.Plain and loaded.cfg.__dict__ == {"depth": 3, "name": "x"}
    assert loaded.mode is ev.Ev.A and loaded.norm_layer.func is nn.BatchNorm2d and loaded.act_layer is nn.ReLU
    assert loaded.norm_layer.keywords == {"eps": 1e-3, "momentum": 0.01}
    with torch.no_grad():
        assert torch.equal(loaded(X), net(X))


@pytest.mark.parametrize("build", ["timm", "transformers", "monai", "efficientnet_pytorch", "ultralytics",
                                   "segmentation_models_pytorch"])  # fmt: skip
def test_a_library_model_saved_by_this_tool_reloads_without_trust(tmp_path, build):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    lib = pytest.importorskip(build)
    if build == "timm":
        model = lib.create_model("resnet18", pretrained=False)
    elif build == "transformers":
        model = lib.BertModel(lib.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                             intermediate_size=32))  # fmt: skip
    elif build == "monai":
        from monai.networks.nets import SegResNet

        model = SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=8)
    elif build == "efficientnet_pytorch":
        model = lib.EfficientNet.from_name("efficientnet-b0")
    elif build == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel("yolov8n.yaml", verbose=False)
    else:
        model = lib.Unet("resnet18", encoder_weights=None, classes=2)
    torch.save(model, tmp_path / "plain.pt")
    loaded = load_model(tmp_path / "plain.pt")
    assert type(loaded) is type(model) and loaded.state_dict().keys() == model.state_dict().keys()
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


# ----------------------------------------------------------------------------- sidecar files


def test_a_sidecar_never_overwrites_the_input_or_an_existing_file_without_force(tmp_path):
    from typer.testing import CliRunner

    from cbam_insert.cli import app

    torch.save(small_net(), tmp_path / "m.pt")
    (tmp_path / "out.pth.recipe.json").write_text("precious")
    runner = CliRunner()
    r = runner.invoke(app, [str(tmp_path / "m.pt"), "--after", "conv", "--input-shape", "1,3,32,32",
                            "-o", str(tmp_path / "out.pth")])  # fmt: skip
    assert r.exit_code == 1 and "recipe.json" in r.output and "--force" in r.output
    assert (tmp_path / "out.pth.recipe.json").read_text() == "precious" and not (tmp_path / "out.pth").exists()
    net_json = tmp_path / "weird.pth.recipe.json"  # the input itself is named like the sidecar
    torch.save(small_net(), net_json)
    r = runner.invoke(app, [str(net_json), "--after", "conv", "--input-shape", "1,3,32,32",
                            "-o", str(tmp_path / "weird.pth"), "--force"])  # fmt: skip
    assert r.exit_code == 1 and "input" in r.output
    assert load_model(net_json) is not None


# ----------------------------------------------------------------------------- fuzzing


def _mutations(data: bytes, rng: random.Random):
    yield "truncate", data[: rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    yield "flip", bytes(out)
    a, b = sorted(rng.randrange(len(data)) for _ in range(2))
    c = rng.randrange(len(data))
    yield "splice", data[:c] + data[a:b] + data[c:]
    yield "delete", data[:a] + data[b:]


FUZZ_SECONDS = float(os.environ.get("CBAM_FUZZ_SECONDS", "30"))


def test_fuzzed_files_raise_only_cbam_insert_error(tmp_path):
    """Byte flips, truncations, deletions and opcode splices of valid files, for a bounded time."""
    rng = random.Random(0)
    seeds = []
    torch.save(small_net(), tmp_path / "a.pt")
    seeds.append(("pickle", tmp_path / "a.pt"))
    patched = insert_cbam(small_net(), after="conv", example_inputs=(X,), seed=0)
    save_model(patched, tmp_path / "b.pt")
    seeds.append(("pickle", tmp_path / "b.pt"))
    torch.save(small_net().state_dict(), tmp_path / "c.pth", _use_new_zipfile_serialization=False)
    seeds.append(("file", tmp_path / "c.pth"))
    seeds.append(("file", tmp_path / "a.pt"))
    deadline = time.monotonic() + FUZZ_SECONDS
    tried = 0
    escaped = []
    while time.monotonic() < deadline:
        kind, src = seeds[tried % len(seeds)]
        if kind == "pickle":
            with zipfile.ZipFile(src) as zf:
                pkl_name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                data = zf.read(pkl_name)
        else:
            data = src.read_bytes()
        for how, mutated in _mutations(data, rng):
            target = tmp_path / f"f{tried % 7}.pt"
            if kind == "pickle":
                replace_pickle(src, target, mutated)
            else:
                target.write_bytes(mutated)
            try:
                load_model(target, arch=None)
            except CBAMInsertError as exc:
                assert "\n" not in str(exc)
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                escaped.append(f"{how} of {src.name}: {type(exc).__name__}: {exc}"[:300])
            tried += 1
            if time.monotonic() >= deadline:
                break
    print(f"\nfuzz: {tried} mutated files in {FUZZ_SECONDS:.0f} s")
    assert tried > 20 and not escaped, escaped[:5]
