"""The hand-written AVX-512 BF16 decode kernel (`bgmv_avx512.cpp`): build, cache, load, call.

Built with the system C++ compiler as a plain shared library (no torch headers, so a build
takes ~3 s instead of the ~1 min of a torch extension), cached under the LoRAMux home by a
hash of the source, the flags and the compiler, and called through ctypes. `PyDLL` keeps
the GIL for the ~20 us of a call, as torch's own ops do: releasing it would let a gRPC
thread take it and make the engine thread wait out the interpreter's switch interval.

The library links libgomp by its soname, which resolves to the copy torch has already
loaded, so the kernel's parallel regions run on the engine thread's own OpenMP team (see
`loramux.server.threads`).

`load_kernel()` answers a `NativeKernel`, or raises `NativeKernelUnavailable` with the
reason (CPU without AVX-512 BF16, no compiler, a failed or timed-out build);
`make_backend` turns that into a start-up error naming it (`--lora-kernel native`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bgmv_avx512.cpp")
FLAGS = (
    "-O3",
    "-std=c++17",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512bf16",
    "-mfma",
    "-fopenmp",
    "-fPIC",
    "-shared",
)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma")
BUILD_TIMEOUT_S = 120.0  # ~3 s on an idle core; a build past this is abandoned
MAX_MEMBERS = 8  # the kernel's limit on projections per fused group

_lock = threading.Lock()
_loaded: NativeKernel | None = None


class NativeKernelUnavailable(RuntimeError):
    """The native kernel cannot run here; the message says why."""


class NativeKernel:
    """The loaded library's entry point, typed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        library = ctypes.PyDLL(str(path))
        self._bgmv = library.loramux_bgmv
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._bgmv.argtypes = [i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr]
        self._bgmv.restype = ctypes.c_int

    def bgmv(
        self,
        rows: int,
        in_features: int,
        members: int,
        outs_ptr: int,
        x_ptr: int,
        classes: int,
        plan_ptr: int,
        route_ptr: int,
        y_ptr: int,
    ) -> None:
        """Shrink + expand of `rows` rows (layouts in bgmv_avx512.cpp); raises on a bad plan."""
        status = self._bgmv(
            rows, in_features, members, outs_ptr, x_ptr, classes, plan_ptr, route_ptr, y_ptr
        )
        if status != 0:
            raise RuntimeError(f"native LoRA kernel refused its arguments (status {status})")


def cpu_supports_kernel() -> str | None:
    """None when this CPU has every instruction set the kernel uses, else what it lacks."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no /proc/cpuinfo (not Linux)"
    lines = (line for line in text.splitlines() if line.startswith("flags"))
    flags = next((line.split(":", 1)[1].split() for line in lines), [])
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    return f"CPU lacks {', '.join(missing)}" if missing else None


def _cache_dir() -> Path:
    home = os.environ.get("LORAMUX_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loramux"
    )
    return Path(home) / "kernels"


def _compiler() -> str:
    name = os.environ.get("CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise NativeKernelUnavailable(f"no C++ compiler ({name!r} not on PATH; set CXX)")
    return path


def _build(compiler: str, timeout: float) -> Path:
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelUnavailable(f"C++ compiler {compiler} does not run: {exc}") from exc
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode()):
        digest.update(part)
    target = _cache_dir() / f"bgmv_avx512-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: concurrent builds never see a partial file.
        fd, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise NativeKernelUnavailable(f"cannot write the kernel cache: {exc}") from exc
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        os.replace(temporary, target)
    except subprocess.TimeoutExpired as exc:
        raise NativeKernelUnavailable(f"kernel build took over {timeout:.0f} s") from exc
    except subprocess.CalledProcessError as exc:
        raise NativeKernelUnavailable(f"kernel build failed: {exc.stderr[-2000:]}") from exc
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    log.info("built the native LoRA kernel: %s", target)
    return target


def load_kernel(timeout: float = BUILD_TIMEOUT_S) -> NativeKernel:
    """The native kernel, built on first use in this process (cached on disk across them)."""
    global _loaded
    with _lock:
        if _loaded is None:
            missing = cpu_supports_kernel()
            if missing is not None:
                raise NativeKernelUnavailable(missing)
            path = _build(_compiler(), timeout)
            try:
                _loaded = NativeKernel(path)
            except OSError as exc:
                raise NativeKernelUnavailable(f"cannot load {path}: {exc}") from exc
        return _loaded
