"""The op `fp4compile::row_extremes`: each row's two largest and two smallest order statistics that OCC needs.

The OCC clamp thresholds (`runtime.occ.occ_thresholds`) interpolate between the
c-th and (c+1)-th largest value of each row, and likewise at the bottom. The
runtime reference takes them from two `aten.topk` calls, which copy each row into
(value, index) pairs and partially sort it. On CPU the lowering calls this op
instead: a small C++ kernel (`cpu_row_extremes.cpp`, one vectorized pass per row
plus a rare exact rescan) that returns the same floats, bit for bit, NaN ordered
as `topk` orders it. Inductor calls it as one extern kernel per activation, so
it adds no generated code to compile; the selection by reductions that it
replaces made each OCC site up to 20 s slower to compile on 2 cores.

The kernel is built on first use (about 2 s of g++) with Inductor's C++ compiler
and vector-ISA flags, into Inductor's cache folder, keyed by the source, the flags and the
compiler (so a cache shared between machines rebuilds per ISA). Where no build
succeeds, `available()` is False and the lowering keeps the top-k reference
(a warning says so once).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_row_extremes.cpp")
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17")
_DTYPES = {torch.float32: "fp4c_row_extremes_f32", torch.float64: "fp4c_row_extremes_f64"}


def _arch_flags() -> list[str]:
    """Inductor's flags for this CPU's vector ISA (e.g. -mavx512f ...): the kernel's lanes need them."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()
        return isa.build_arch_flags().split() if isa else []
    except Exception:  # an ISA probe that fails leaves the portable (slower) build
        return []


def _compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:
        return os.environ.get("CXX", "g++")


def _cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "fp4compile"


@functools.lru_cache(maxsize=None)
def _library():
    """The built kernel as a ctypes library, or None (with one warning) where it cannot be built."""
    compiler, arch = _compiler(), _arch_flags()
    source = SOURCE.read_bytes()
    errors = []
    # OpenMP first (rows in parallel on torch's threads), then without it.
    for openmp in (["-fopenmp"], []):
        flags = [*BASE_FLAGS, *arch, *openmp]
        key = hashlib.sha256(source + repr((compiler, flags)).encode()).hexdigest()[:20]
        target = _cache_dir() / f"row_extremes_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the target, then rename: concurrent builders never load a partial file.
            fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                result = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial], capture_output=True,
                                        text=True)
                failure = result.stderr.strip()[-500:] if result.returncode != 0 else None
            except OSError as error:  # no such compiler
                failure = str(error)
            if failure is not None:
                os.unlink(partial)
                errors.append(f"{compiler} {' '.join(flags)}: {failure}")
                continue
            os.replace(partial, target)
        library = ctypes.CDLL(str(target))
        for name in _DTYPES.values():
            fn = getattr(library, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        return library
    warnings.warn("fp4compile: the CPU kernel for the OCC thresholds did not build; the CPU lowering "
                  "uses top-k instead (same values, slower to run). " + " | ".join(errors), stacklevel=2)
    return None


@torch.compiler.assume_constant_result  # dynamo calls it while tracing, never traces the build
def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    return _library() is not None


@torch.library.custom_op("fp4compile::row_extremes", mutates_args=())
def row_extremes(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, bottom), [..., 2] each: the (k-1)-th and k-th largest of each row along the last dim,
    and the (k-1)-th and k-th smallest (both k-th for k = 1), as `topk` orders them.

    float32 and float64 rows on CPU, 1 <= k <= row width.
    """
    if x.dtype not in _DTYPES or x.device.type != "cpu":
        raise ValueError(f"row_extremes: float32 or float64 CPU rows, got {x.dtype} on {x.device}")
    n = x.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"row_extremes: k = {k} outside 1..{n} (the row width)")
    library = _library()
    if library is None:
        raise RuntimeError("row_extremes: the CPU kernel is not available (see the build warning)")
    x = x.contiguous()
    top, bottom = _outputs(x)
    rows = x.numel() // n
    if rows:
        status = getattr(library, _DTYPES[x.dtype])(x.data_ptr(), rows, n, k, top.data_ptr(), bottom.data_ptr(),
                                                    torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"row_extremes: kernel status {status} (rows {rows}, width {n}, k {k})")
    return top, bottom


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's two results, empty: [..., 2] each, x's dtype and device."""
    return x.new_empty(x.shape[:-1] + (2,)), x.new_empty(x.shape[:-1] + (2,))


@row_extremes.register_fake
def _(x, k):
    return _outputs(x)
