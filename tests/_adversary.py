"""Tools for the adversarial suite: a fake installed library, hand-made pickles, a measured CLI run.

The library ``evilpkg`` is installed the way pip does it (a package plus a ``.dist-info`` with a
RECORD) into a directory put on ``PYTHONPATH``, so the loader's import rules treat it as an
installed distribution: the only thing between its code and the file is how the file may use it.
Every callable in it touches the marker file it is given (or ``$EVIL_MARKER``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

EVILPKG = {
    "evilpkg/__init__.py": '''
        import enum, os
        from torch import nn

        def _touch(marker=None):
            open(marker or os.environ.get("EVIL_MARKER", "/nonexistent/marker"), "w").close()

        def touch(marker=None):
            _touch(marker)

        class Net(nn.Module):
            """Its constructor runs code (like ultralytics' DetectionModel, which eval()s its config)."""
            def __init__(self, marker=None, *args, **kwargs):
                super().__init__()
                _touch(marker)
            def forward(self, x):
                return x

        class Hooked(nn.Module):
            def __setstate__(self, state):
                _touch()
                super().__setstate__(state)

        class SetAttr(nn.Module):
            def __setattr__(self, name, value):
                _touch()
                super().__setattr__(name, value)

        class Copier(nn.Module):
            def __reduce_ex__(self, protocol):
                _touch()
                return super().__reduce_ex__(protocol)

        class Cfg:
            def __setstate__(self, state):
                _touch()
                self.__dict__.update(state)

        class Finalized:
            def __del__(self):
                _touch()

        class Caller:
            def __call__(self, *args):
                _touch()

        class Hashy:
            def __hash__(self):
                _touch()
                return 1

        class Ev(enum.Enum):
            A = 1
            @classmethod
            def _missing_(cls, value):
                _touch()
                return cls.A

        class Plain:
            """A data-only class: restored by writing its __dict__."""

        from os import system  # an alias: importable as evilpkg.system, defined elsewhere
    ''',
    "evilpkg/__main__.py": """
        import evilpkg
        evilpkg._touch()
        class X:
            pass
    """,
    "evilpkg/sideeffect.py": """
        import evilpkg
        evilpkg._touch()  # importing this module is the side effect
        class Thing:
            pass
    """,
}

SHADOW = {
    # a package of the same name in the working directory: must never be imported
    "evilpkg/__init__.py": "open(__import__('os').environ['EVIL_MARKER'], 'w').close()\nclass Net: pass\n",
    "evilpkg/shadowonly.py": "open(__import__('os').environ['EVIL_MARKER'], 'w').close()\nclass Thing: pass\n",
    "localmod.py": "open(__import__('os').environ['EVIL_MARKER'], 'w').close()\nclass Net: pass\n",
}


def install_evilpkg(site: Path) -> Path:
    """Install ``evilpkg`` into ``site`` with a dist-info RECORD; return ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    record = []
    for rel, text in EVILPKG.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = textwrap.dedent(text).lstrip().encode()
        path.write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{rel},sha256={digest},{len(data)}")
    info = site / "evilpkg-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evilpkg\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("evilpkg\n")
    record += [
        "evilpkg-1.0.dist-info/METADATA,,",
        "evilpkg-1.0.dist-info/top_level.txt,,",
        "evilpkg-1.0.dist-info/RECORD,,",
    ]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return site


def write_shadow(cwd: Path) -> None:
    for rel, text in SHADOW.items():
        path = cwd / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# ----------------------------------------------------------------------------- hand-made pickles


class Reduce:
    """Pickles as ``func(*args)`` (REDUCE), optionally followed by BUILD with ``state``."""

    def __init__(self, func: Any, args: tuple = (), state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class NewObj:
    """Pickles as ``cls.__new__(cls, *args)`` (NEWOBJ), then BUILD with ``state``."""

    def __init__(self, cls: type, state: Any = None, args: tuple = ()) -> None:
        self.cls, self.state, self.args = cls, state, args

    @property  # type: ignore[misc]
    def __class__(self):
        return self.cls

    def __reduce__(self):
        import copyreg

        return (copyreg.__newobj__, (self.cls, *self.args), self.state)


def module_state(**extra: Any) -> dict[str, Any]:
    """The ``__dict__`` of an empty ``nn.Module``, plus ``extra``."""
    from torch import nn

    return dict(nn.Module().__dict__) | extra


def op_global(mod: str, name: str) -> bytes:
    return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(n: int) -> bytes:
    if 0 <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data if len(data) < 256 else b"\x8b" + struct.pack("<i", len(data)) + data


def pickle_bytes(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=2)


def write_archive(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, *, deflate_pickle: bool = False,
                  deflate_storages: bool = False) -> Path:  # fmt: skip
    """A zip laid out like ``torch.save``'s (``archive/data.pkl``, ``archive/data/KEY``)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            zipfile.ZipInfo("archive/data.pkl"), pkl, zipfile.ZIP_DEFLATED if deflate_pickle else zipfile.ZIP_STORED
        )
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(zipfile.ZipInfo(f"archive/data/{key}"), data,
                        zipfile.ZIP_DEFLATED if deflate_storages else zipfile.ZIP_STORED)  # fmt: skip
        zf.writestr("archive/version", "3\n")
    return path


def replace_pickle(src: Path, dst: Path, pkl: bytes) -> Path:
    """``src`` (a torch.save zip) with its data.pkl replaced by ``pkl``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = pkl if info.filename.endswith("data.pkl") else zin.read(info)
            zout.writestr(zipfile.ZipInfo(info.filename), data, zipfile.ZIP_STORED)
    return dst


# ----------------------------------------------------------------------------- measured runs


@dataclass
class Run:
    rc: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    wall_s: float
    peak_mb: float


def _hwm_mb(pid: int | str) -> float | None:
    """The peak resident set (VmHWM) of a live process. ``ru_maxrss`` would not do: Linux carries the
    parent's peak across fork and exec, so a child of a big pytest process starts "at" its size."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_measured(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 60.0, stdin: Any = None) -> Run:
    """Run ``argv`` in a fresh process; its wall time and peak RSS (VmHWM, polled), killed at ``timeout``."""
    out, err = cwd / f".out.{time.monotonic_ns()}", cwd / f".err.{time.monotonic_ns()}"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fo, stderr=fe,
                                stdin=stdin if stdin is not None else subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        rc: int | None = None
        peak = 0.0
        while True:
            peak = max(peak, _hwm_mb(proc.pid) or 0.0)
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = rc if rc is not None else -9
    text_out, text_err = out.read_text(errors="replace"), err.read_text(errors="replace")
    out.unlink()
    err.unlink()
    return Run(rc, text_out, text_err, wall, peak)


def child_env(site: Path, marker: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site)])
    env["EVIL_MARKER"] = str(marker)
    env["OMP_NUM_THREADS"] = "1"
    env["YOLO_OFFLINE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["YOLO_CONFIG_DIR"] = str(marker.parent / "yolo-config")
    env["NO_COLOR"] = "1"
    return env | extra


BATCH = r"""
import contextlib, io, json, os, signal, sys, time
files = json.loads(sys.argv[1])
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) / 1024 for l in fh if l.startswith("VmHWM:"))
results = []
def alarm(*_):
    raise TimeoutError("time limit")
signal.signal(signal.SIGALRM, alarm)
from cbam_insert import cli
import torch
x = torch.rand(1, 3, 32, 32)  # the baseline: the CLI imported and torch's allocator warmed up
base = hwm()
for name, argv, cwd, limit in files:
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    rc = None
    signal.alarm(int(limit))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sys.argv = ["cbam-insert", *argv]
            try:
                cli.main()
                rc = 0
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
    except TimeoutError:
        rc = None
    finally:
        signal.alarm(0)
    results.append({"name": name, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "wall_s": time.perf_counter() - start,
                    "peak_mb": hwm()})
    with open(os.environ["BATCH_OUT"], "w") as fh:
        json.dump({"base_mb": base, "results": results}, fh)
"""


def run_batch(cases: list[tuple[str, list[str], Path]], *, site: Path, marker: Path, work: Path,
              limit_s: int = 20, timeout: float = 600.0) -> tuple[float, list[dict[str, Any]], Run]:  # fmt: skip
    """Run the CLI on each case in one fresh process (imports paid once); results per case.

    Peak RSS is a high-water mark, so each case's ``peak_mb`` bounds its own peak; ``base_mb`` is the
    process after importing the CLI.
    """
    result_file = work / "batch.json"
    env = child_env(site, marker, BATCH_OUT=str(result_file))
    spec = json.dumps([(n, a, str(c), limit_s) for n, a, c in cases])
    run = run_measured([sys.executable, "-c", BATCH, spec], cwd=work, env=env, timeout=timeout)
    data = json.loads(result_file.read_text()) if result_file.exists() else {"base_mb": float("nan"), "results": []}
    return data["base_mb"], data["results"], run
