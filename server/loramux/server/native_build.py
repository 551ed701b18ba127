"""Hand-written CPU kernels: check the CPU, build with the system compiler, cache, load.

A kernel is one C++ file built as a plain shared library (no torch headers, so a build
takes seconds instead of the ~1 min of a torch extension), cached under the LoRAMux home
by a hash of its source, the flags and the compiler's version, and called through ctypes.
Used by the native LoRA kernel (lora/backend/native.py), the paged-attention kernel
(paged_attention/native.py) and the NF4 matmul (nf4/native.py).

The libraries link libgomp by its soname, which resolves to the copy torch has already
loaded, so their parallel regions run on the engine thread's own OpenMP team (see
`loramux.server.threads`).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K")

AVX512_BF16_FLAGS = (
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
AVX512_BF16_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma")
# The NF4 matmul (nf4/nf4_avx2.cpp): AVX2 + FMA, which every x86-64 server CPU of the last
# decade has (the 2-CPU AMD EPYC these numbers come from has AVX2 but no AVX-512).
AVX2_FMA_FLAGS = (
    "-O3",
    "-std=c++17",
    "-mavx2",
    "-mfma",
    "-ffp-contract=off",  # a*b+c as two roundings, as bitsandbytes computes the scales
    "-fopenmp",
    "-fPIC",
    "-shared",
)
AVX2_FMA_CPU_FLAGS = ("avx2", "fma")
BUILD_TIMEOUT_S = 120.0  # a few seconds on an idle core; a build past this is abandoned


class NativeKernelUnavailable(RuntimeError):
    """A native kernel cannot run here; the message says why."""


def cpu_lacks(flags: tuple[str, ...] = AVX512_BF16_CPU_FLAGS) -> str | None:
    """None when this CPU has every instruction set in `flags`, else what it lacks."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no /proc/cpuinfo (not Linux)"
    lines = (line for line in text.splitlines() if line.startswith("flags"))
    present = next((line.split(":", 1)[1].split() for line in lines), [])
    missing = [flag for flag in flags if flag not in present]
    return f"CPU lacks {', '.join(missing)}" if missing else None


def cache_dir() -> Path:
    home = os.environ.get("LORAMUX_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loramux"
    )
    return Path(home) / "kernels"


def compiler() -> str:
    name = os.environ.get("CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise NativeKernelUnavailable(f"no C++ compiler ({name!r} not on PATH; set CXX)")
    return path


def build_library(
    source: Path,
    flags: tuple[str, ...] = AVX512_BF16_FLAGS,
    timeout: float = BUILD_TIMEOUT_S,
) -> Path:
    """The shared library built from `source` (cached on disk across processes)."""
    cxx = compiler()
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelUnavailable(f"C++ compiler {cxx} does not run: {exc}") from exc
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(flags).encode(), version.encode()):
        digest.update(part)
    target = cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"
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
            [cxx, *flags, str(source), "-o", temporary],
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
    log.info("built the native kernel %s: %s", source.name, target)
    return target


def entry_point(path: Path, symbol: str, argtypes: list[Any]) -> Any:
    """`symbol` of the library at `path`, typed, returning a C int status. Through `PyDLL`,
    which keeps the GIL for the call, as torch's own ops do: releasing it would let a gRPC
    thread take it and make the engine thread wait out the interpreter's switch interval."""
    function = getattr(ctypes.PyDLL(str(path)), symbol)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def choose_native(mode: str, option: str, fallback: str, load: Callable[[], K]) -> K | None:
    """`load()`'s kernel, or None where it cannot run: then `native` (`mode`) is a start-up
    error naming why (`option` is the flag, e.g. "--nf4-kernel"), and auto logs the reason
    with what runs instead (`fallback`)."""
    try:
        return load()
    except NativeKernelUnavailable as exc:
        if mode == "native":
            raise ValueError(f"{option} native is not available here: {exc}") from exc
        log.info("%s (the native kernel cannot run here: %s)", fallback, exc)
        return None


class KernelLoader(Generic[K]):
    """One kernel library per process: checked, built (or found in the cache) and wrapped
    on first use, from any thread; later calls answer the same object."""

    def __init__(
        self,
        source: Path,
        wrap: Callable[[Path], K],
        flags: tuple[str, ...] = AVX512_BF16_FLAGS,
        cpu_flags: tuple[str, ...] = AVX512_BF16_CPU_FLAGS,
    ) -> None:
        self.source = source
        self._wrap = wrap
        self._flags = flags
        self._cpu_flags = cpu_flags
        self._lock = threading.Lock()
        self._loaded: K | None = None

    def load(self, timeout: float = BUILD_TIMEOUT_S) -> K:
        """The wrapped library, or `NativeKernelUnavailable` saying why it cannot run here."""
        with self._lock:
            if self._loaded is None:
                missing = cpu_lacks(self._cpu_flags)
                if missing is not None:
                    raise NativeKernelUnavailable(missing)
                path = build_library(self.source, self._flags, timeout=timeout)
                try:
                    self._loaded = self._wrap(path)
                except OSError as exc:
                    raise NativeKernelUnavailable(f"cannot load {path}: {exc}") from exc
            return self._loaded
