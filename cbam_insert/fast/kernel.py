"""Optional native CPU kernel: one compiled call per CBAM forward in CPU inference.

The default CBAM runs as some 15 PyTorch operations a call. In a whole model on a CPU each of
them pays for caches that the model's convolutions have just filled with other data, so the
module costs about twice what it costs on its own. ``cbam_insert/csrc/cbam_cpu.cpp`` does the
same maths in one call and three passes over the feature map (spatial pools; the channel pools
of ``a * F``; the product), with the MLP and the k x k convolution between them, vectorised with
ATen's ``Vectorized`` and spread over PyTorch's intra-op threads.

It is opt-in, because it is compiled on the user's machine with ``torch.utils.cpp_extension``
the first time (a C++ compiler, ninja and Python's headers; about 20 s, then cached under
``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``)::

    import cbam_insert.native
    cbam_insert.native.enable()         # builds or loads; CBAMInsertError saying why if it cannot

or ``CBAM_INSERT_NATIVE=1`` in the environment (read when cbam_insert is imported), which
enables it at the first CBAM call that could use it and, if the build fails, warns once and goes
on without it. ``python -m cbam_insert.native`` builds it ahead of time (``-v`` shows the
compiler's output).

A call uses the kernel when it would take the fused inference path anyway (channel then spatial,
avg+max pooling, either variant; no autograd graph recorded; not tracing, compiling, exporting
or under a dispatch mode such as a FLOP counter), the input is a float32 CPU tensor, contiguous
or channels-last (1-, 2- or 3-D CBAM), and the spatial BatchNorm, if any, is in eval mode. Everything else,
training included, runs the PyTorch path as before. The results agree with it to float32
rounding (sums taken in another order), not bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import CBAMInsertError
from .eager import _CONVS, may_reuse, memory_format, tracing

__all__ = ["ENV_VAR", "attend", "build", "disable", "enable", "is_enabled", "main"]

ENV_VAR = "CBAM_INSERT_NATIVE"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "cbam_cpu.cpp"
_forward: Any = None  # the kernel's CBAM forward while enabled
_env_pending = ENV_VAR in os.environ  # cleared by the first eligible call, which asks once
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

_lock = threading.Lock()
_extension: Any = None  # the loaded extension module, once built


def _flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags. Measured on Linux x86-64 only; elsewhere they are a best guess."""
    avx2 = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    )
    defines = ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"] if avx2 else []
    if sys.platform == "win32":  # MSVC; no OpenMP: at::parallel_for then runs on one thread
        return ["/O2", *(["/arch:AVX2", *(d.replace("-D", "/D") for d in defines)] if avx2 else [])], []
    # -fopenmp: at::parallel_for only spreads work over threads when compiled with OpenMP; the
    # extension then runs on the libgomp.so.1 that torch has already loaded (same soname). Apple's
    # clang has no OpenMP, so on macOS the kernel runs on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cflags = ["-O3", *openmp, *(defines + ["-mavx2", "-mfma", "-mf16c"] if avx2 else [])]
    return cflags, openmp


def _name(flags: list[str]) -> str:
    """An extension name per source, flags and torch version, so that caches never mix them."""
    digest = hashlib.sha256()
    digest.update(_SOURCE.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    return f"cbam_insert_cpu_{digest.hexdigest()[:12]}"


def _first_error_line(text: str) -> str:
    """The compiler's or linker's first diagnostic in a failed build's output, else its first line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("error:", "undefined reference", "cannot find", "ld returned"):
        for ln in lines:
            if marker in ln.lower():
                return ln[:300]
    return lines[0][:300] if lines else "unknown error"


def build(verbose: bool = False) -> Any:
    """Compile (first time) or load the kernel and return the extension module.

    Raises ``CBAMInsertError`` with a one-line reason when it cannot: no C++ compiler, no ninja,
    a failed compilation. Thread-safe; concurrent processes share the build through
    ``torch.utils.cpp_extension``'s lock file.
    """
    global _extension
    with _lock:
        if _extension is not None:
            return _extension
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise CBAMInsertError(
                f"cannot build cbam-insert's native CPU kernel: no C++ compiler {compiler!r} on PATH "
                "(install g++ or clang, or set CXX)"
            )
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)  # its import warns that there is no CUDA, which is beside the point here
        path = os.environ.get("PATH", "")
        # `pip install ninja` in a virtual environment that is not activated: its bin is not on PATH
        os.environ["PATH"] = (
            os.pathsep.join([path, str(Path(sys.executable).parent)]) if path else str(Path(sys.executable).parent)
        )
        try:
            from torch.utils import cpp_extension

            try:
                cpp_extension.verify_ninja_availability()
            except RuntimeError:
                raise CBAMInsertError(
                    "cannot build cbam-insert's native CPU kernel: ninja is not installed (pip install ninja)"
                ) from None
            cflags, ldflags = _flags()
            try:
                ext = cpp_extension.load(
                    name=_name(cflags + ldflags),
                    sources=[str(_SOURCE)],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    verbose=verbose,
                )
            except Exception as exc:  # noqa: BLE001 - a compiler's failure, reported in one line
                raise CBAMInsertError(
                    f"cannot build cbam-insert's native CPU kernel: {_first_error_line(str(exc))}"
                ) from None
        finally:
            logger.setLevel(level)
            os.environ["PATH"] = path
        _extension = ext
        return ext


def enable(verbose: bool = False) -> None:
    """Build or load the kernel and use it for every eligible CBAM call from now on."""
    global _forward
    _forward = build(verbose=verbose).cbam_forward


def disable() -> None:
    """Go back to the PyTorch path (the built kernel stays cached for a later ``enable``)."""
    global _forward
    _forward = None


def is_enabled() -> bool:
    """Whether eligible CBAM calls use the native kernel now."""
    return _forward is not None


def enable_from_env() -> Any:
    """``CBAM_INSERT_NATIVE``'s effect, asked for once per process by the first eligible CBAM call
    (``attend``): the kernel's forward when the variable asks for it and the build
    works, else None (with one warning when it was asked for and could not be had)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _FALSE:
        return None
    if value not in _TRUE:
        warnings.warn(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of {_TRUE + _FALSE[1:]}; the native kernel stays off",
            stacklevel=3,
        )
        return None
    try:
        enable()
    except CBAMInsertError as exc:
        warnings.warn(f"{ENV_VAR} is set but {exc}; CBAM runs on the PyTorch path", stacklevel=3)
        return None
    return _forward


def attend(cbam: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The fused inference forward on the native CPU kernel, or None where it does not apply
    : it is not enabled, or not a contiguous or channels-last float32 CPU input
    without autograd, or tracing / a dispatch mode, or a spatial BatchNorm in training mode."""
    global _env_pending
    if _forward is None and not _env_pending:
        return None
    cg, sg = cbam.channel_gate, cbam.spatial_gate
    assert cg is not None and sg is not None
    norm = sg.norm
    dims = cbam.dims
    if (
        x.dim() != dims + 2
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or type(x) is not torch.Tensor
        or not (x.is_contiguous() or (dims > 1 and x.is_contiguous(memory_format=memory_format(x))))
        or x.numel() == 0
        or (torch.is_grad_enabled() and x.requires_grad)
        or type(sg.conv) is not _CONVS[dims - 1]
        or sg.conv.padding_mode != "zeros"
        or cg.fc1.weight.dtype != torch.float32
        or cg.fc1.weight.device.type != "cpu"
        or (norm is not None and (norm.training or norm.running_mean is None or norm.running_var is None))
        or tracing()
        or _get_current_dispatch_mode() is not None
    ):
        return None
    if _forward is None:
        _env_pending = False
        if enable_from_env() is None:
            return None
    out = x if may_reuse(cbam, x) else torch.empty_like(x)
    return _forward(
        x,
        cg.fc1.weight,
        cg.fc1.bias,
        cg.fc2.weight,
        cg.fc2.bias,
        sg.conv.weight,
        sg.conv.bias,
        sg.max_first,
        None if norm is None else norm.weight,
        None if norm is None else norm.bias,
        None if norm is None else norm.running_mean,
        None if norm is None else norm.running_var,
        1e-5 if norm is None else float(norm.eps),
        out,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m cbam_insert.native [-v]``: build (or find) the kernel now and say where it is."""
    import time

    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a not in ("-v", "--verbose")]
    if unknown:
        print(f"error: unknown argument {unknown[0]!r}; usage: python -m cbam_insert.native [-v]", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        ext = build(verbose="-v" in args or "--verbose" in args)
    except CBAMInsertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cbam-insert native CPU kernel ready: {ext.__file__} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
