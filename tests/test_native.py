"""The optional native CPU kernel (cbam_insert.native): same results as the PyTorch path where it
applies, never used where it does not, and a clear error or warning where it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from cbam_insert import CBAM, CBAMInsertError, insert_cbam, native
from cbam_insert.fast import kernel as K

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel(native_kernel):
    return native_kernel


@pytest.fixture
def calls(kernel, monkeypatch):
    """Enable the kernel for one test and count its calls."""
    seen: list[tuple[int, ...]] = []

    def counting(x, *args):
        seen.append(tuple(x.shape))
        return kernel.cbam_forward(x, *args)

    monkeypatch.setattr(K, "_forward", counting)
    return seen


def _pytorch_path(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    saved = K._forward
    K._forward = None
    try:
        return module(x)
    finally:
        K._forward = saved


def _both_paths(module: torch.nn.Module, x: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(PyTorch path, kernel) outputs in inference mode on ``threads`` intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _pytorch_path(module, x), module(x)
    finally:
        torch.set_num_threads(old)


def _official(channels: int, **kw) -> CBAM:
    m = CBAM(channels, variant="official", **kw).eval()
    norm = m.spatial_gate.norm
    norm.running_mean.fill_(0.3)
    norm.running_var.fill_(2.5)
    with torch.no_grad():
        norm.weight.fill_(1.7)
        norm.bias.fill_(-0.4)
    return m


CASES = {
    "plain-56": (lambda: CBAM(64), (1, 64, 56, 56)),
    "plain-odd": (lambda: CBAM(40), (3, 40, 13, 11)),
    "plain-tiny-map": (lambda: CBAM(32, kernel_size=3), (2, 32, 3, 3)),
    "one-channel": (lambda: CBAM(1), (2, 1, 5, 5)),
    "k1": (lambda: CBAM(16, kernel_size=1), (2, 16, 9, 9)),
    "mlp-bias": (lambda: CBAM(48, mlp_bias=True, reduction=4), (2, 48, 10, 12)),
    "official": (lambda: _official(64), (2, 64, 14, 14)),
    "official-no-norm": (lambda: CBAM(64, variant="official", spatial_norm=False), (1, 64, 7, 7)),
    # 1.6 MiB a sample: the kernel works on blocks of two samples, the last block has one
    "blocks": (lambda: CBAM(256), (5, 256, 40, 40)),
    "1d": (lambda: CBAM(24, dims=1), (3, 24, 37)),
    "1d-official": (lambda: _official(24, dims=1), (2, 24, 50)),
    "3d": (lambda: CBAM(32, dims=3), (2, 32, 5, 9, 11)),
    "3d-k3": (lambda: CBAM(16, dims=3, kernel_size=3), (1, 16, 4, 6, 6)),
    "3d-official": (lambda: _official(32, dims=3), (2, 32, 3, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_matches_the_pytorch_path(case, threads, calls):
    make, shape = CASES[case]
    module = make().eval()
    with torch.no_grad():  # random weights large enough that the gates are not all ~0.5
        for p in module.parameters():
            p.mul_(3)
    x = torch.randn(shape)
    expected, got = _both_paths(module, x, threads)
    assert calls == [shape]
    assert got.shape == expected.shape and got.data_ptr() != x.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, x)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, threads", [((2, 64, 20, 20), 2), ((1, 64, 20, 20), 2), ((1, 32, 5, 9), 3)])
def test_kernel_reuses_the_input_like_the_pytorch_path(layout, shape, threads, calls):
    # one sample and several threads too: the output is written into the input only after every
    # thread has finished reading it
    module = CBAM(shape[1], reuse_input=True).eval()
    x = torch.randn(shape).to(memory_format=layout)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            expected = _pytorch_path(module, x.clone())
            y = x.clone()
            got = module(y)
    finally:
        torch.set_num_threads(old)
    assert len(calls) == 1
    assert got.data_ptr() == y.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_kernel_keeps_a_nan_where_the_pytorch_path_does(calls):
    module = CBAM(16).eval()
    x = torch.randn(1, 16, 8, 8)
    x[0, 3, 2, 5] = float("nan")
    with torch.no_grad():
        expected = _pytorch_path(module, x)
        got = module(x)
    assert calls
    assert torch.equal(torch.isnan(got), torch.isnan(expected))


def test_kernel_in_a_whole_model(calls):
    model = insert_cbam(torchvision.models.resnet18(weights=None), after="block", seed=0).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        expected = _pytorch_path(model, x)
        got = model(x)
    assert len(calls) == sum(isinstance(m, CBAM) for m in model.modules()) == 8
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_kernel_in_a_video_network(calls):
    # torchvision's R3D-18: 3-D CBAM (Conv3d spatial gate) on its residual branches
    model = insert_cbam(torchvision.models.video.r3d_18(weights=None), after="block",
                        example_inputs=(torch.randn(1, 3, 4, 32, 32),), seed=0).eval()  # fmt: skip
    n = sum(isinstance(m, CBAM) for m in model.modules())
    assert n == 8
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.inference_mode():
        expected = _pytorch_path(model, x)
        got = model(x)
    assert len(calls) == n
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _fallback_cases():
    def train_grad():
        m = CBAM(16)
        return m, torch.randn(2, 16, 8, 8, requires_grad=True), torch.enable_grad

    def strided():
        return CBAM(16).eval(), torch.randn(2, 16, 8, 16)[..., ::2], torch.no_grad

    def float64():
        return CBAM(16).double().eval(), torch.randn(2, 16, 8, 8, dtype=torch.float64), torch.no_grad

    def bfloat16():
        return CBAM(16).to(torch.bfloat16).eval(), torch.randn(2, 16, 8, 8, dtype=torch.bfloat16), torch.no_grad

    def strided_1d():
        return CBAM(16, dims=1).eval(), torch.randn(2, 30, 16).transpose(1, 2), torch.no_grad

    def norm_in_training():
        return _official(16).train(), torch.randn(2, 16, 8, 8), torch.no_grad

    def parallel_order():
        return CBAM(16, order="parallel").eval(), torch.randn(2, 16, 8, 8), torch.no_grad

    def flop_counter():
        return CBAM(16).eval(), torch.randn(2, 16, 8, 8), lambda: FlopCounterMode(display=False)

    return {f.__name__: f for f in (train_grad, strided, float64, bfloat16, strided_1d, norm_in_training,
                                    parallel_order, flop_counter)}  # fmt: skip


FALLBACKS = _fallback_cases()


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_kernel_is_not_used_where_it_does_not_apply(case, calls):
    module, x, context = FALLBACKS[case]()
    with context():
        got = module(x)
    assert calls == []
    assert got.shape == x.shape


def test_kernel_is_not_used_under_tracing_and_export(calls):
    module = CBAM(16).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(module, x, check_trace=False)  # the check reruns it eagerly
        exported = torch.export.export(module, (x,))
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(traced(x), _pytorch_path(module, x))
        torch.testing.assert_close(exported.module()(x), _pytorch_path(module, x))


def test_enable_and_disable(kernel):
    saved = K._forward
    try:
        native.disable()
        assert not native.is_enabled()
        native.enable()
        assert native.is_enabled()
        native.disable()
        assert not native.is_enabled()
    finally:
        K._forward = saved


def test_enable_without_a_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(K, "_extension", None)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(CBAMInsertError, match=r"^cannot build .*no C\+\+ compiler '/nonexistent/c\+\+'") as info:
        native.enable()
    assert "\n" not in str(info.value)


def test_enable_without_ninja_says_how_to_get_it(monkeypatch):
    from torch.utils import cpp_extension

    def missing():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(K, "_extension", None)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", missing)
    with pytest.raises(CBAMInsertError, match=r"ninja is not installed \(pip install ninja\)"):
        native.enable()


def test_a_failed_compilation_is_reported_in_one_line(monkeypatch, tmp_path):
    source = tmp_path / "cbam_cpu.cpp"
    source.write_text('#error "broken on purpose"\n')
    monkeypatch.setattr(K, "_extension", None)
    monkeypatch.setattr(K, "_SOURCE", source)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(CBAMInsertError, match=r"^cannot build cbam-insert's native CPU kernel: .*broken on purpose"):
        native.build()


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != native.ENV_VAR}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
    )


ENV_PROBE = """
    import warnings, torch
    import cbam_insert.native as native
    from cbam_insert import CBAM
    warnings.simplefilter("always")
    m = CBAM(16).eval()
    print("before", native.is_enabled())
    with torch.no_grad():
        y = m(torch.randn(1, 16, 8, 8))
        m(torch.randn(1, 16, 8, 8))
    print("after", native.is_enabled(), tuple(y.shape))
"""


def test_environment_variable_enables_it_at_the_first_call(kernel):
    r = _run(ENV_PROBE, CBAM_INSERT_NATIVE="1")
    assert r.returncode == 0, r.stderr
    assert "before False" in r.stdout and "after True (1, 16, 8, 8)" in r.stdout
    assert "Warning" not in r.stderr and "CUDA" not in r.stderr


def test_environment_variable_falls_back_with_one_warning_when_it_cannot_build(tmp_path):
    r = _run(ENV_PROBE, CBAM_INSERT_NATIVE="1", CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "after False (1, 16, 8, 8)" in r.stdout
    assert r.stderr.count("CBAM_INSERT_NATIVE is set but cannot build") == 1
    assert "no C++ compiler" in r.stderr


@pytest.mark.parametrize("value, warns", [("0", False), ("maybe", True)])
def test_environment_variable_off_or_unknown(value, warns):
    r = _run(ENV_PROBE, CBAM_INSERT_NATIVE=value)
    assert r.returncode == 0, r.stderr
    assert "after False" in r.stdout
    assert ("is not one of" in r.stderr) == warns


@pytest.mark.parametrize(
    "case", ["plain-56", "plain-odd", "plain-tiny-map", "one-channel", "mlp-bias", "official", "3d", "3d-official"]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_on_channels_last_inputs(case, threads, calls):
    make, shape = CASES[case]
    module = make().eval()
    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = torch.randn(shape).to(memory_format=layout)
    expected, got = _both_paths(module, x, threads)
    assert calls == [shape]
    assert got.is_contiguous(memory_format=layout)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_kernel_in_a_channels_last_model(calls):
    # .to(memory_format=channels_last) also makes the spatial conv's 4-D weight channels-last
    model = insert_cbam(torchvision.models.resnet18(weights=None), after="block", seed=0).eval()
    model = model.to(memory_format=torch.channels_last)
    assert not model.get_submodule("layer1.0.cbam_add").spatial_gate.conv.weight.is_contiguous()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = _pytorch_path(model, x)
        got = model(x)
    assert len(calls) == 8
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_module_entry_point_builds_ahead_of_time(kernel, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cbam_insert.native"], capture_output=True, text=True, check=False,
                       cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cbam-insert native CPU kernel ready: ") and ".so" in r.stdout
    env = {k: v for k, v in os.environ.items() if k != native.ENV_VAR}
    env.update(CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "cbam_insert.native"], capture_output=True, text=True, check=False,
                       cwd=ROOT, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.startswith("error: cannot build") and r.stderr.count("\n") == 1


def test_kernel_with_identity_init_keeps_the_gate(calls):
    module = CBAM(32, init="identity").eval()
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        assert torch.equal(module(x), x)  # gamma = 0: exactly the input, kernel or not
        module.gamma.fill_(0.3)
        expected = _pytorch_path(module, x)
        got = module(x)
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_module_entry_point_rejects_unknown_arguments():
    assert native.main(["--bogus"]) == 2
