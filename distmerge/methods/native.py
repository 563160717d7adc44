"""Build and load the kernels (kernels.c and the *_kernels.c beside it): a small C library compiled on first use
with the machine's C compiler and cached.

Compiled once per machine and source version (the file name carries a hash of the source and the flags) into
`distmerge/methods/__pycache__/` when that is writable, else `$XDG_CACHE_HOME/distmerge` (~/.cache): a build
writes a temporary file and renames it, so concurrent merge processes never load half a library. Installing
(`make venv`) builds it ahead. Without a C compiler `library()` is None and merges take the torch path (the
same bytes, slower); DISTMERGE_KERNELS=torch asks for that path on purpose. No -march=native: the library
may travel with the environment to other machines; on x86-64 with GCC the hot loops carry AVX2 clones
chosen at load time.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("kernels.c", "combine_kernels.c", "della_kernels.c", "random_kernels.c")]
HEADER = Path(__file__).with_name("kernels.h")
# -ffp-contract=off: no fused multiply-adds (torch rounds a product and a sum separately).
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_F32 = ctypes.c_float
_SIGNATURES = {
    "bf16_delta": [_P, _P, _I64, _P],
    "add_to_bf16": [_P, _P, _I64, _P],
    "add_to_bf16_target": [_P, _P, _I64, _P],
    "bf16_deltas": [_P, _P, _I64, _I64, _P, _P],
    "high_histogram": [_P, _P, _I64, _P],
    "bin_histogram": [_P, _P, _I64, _I64, _P],
    "bin_histogram_pair": [_P, _P, _I64, _I64, _I64, _P, _P],
    "keep_at_least": [_P, _I64, _F32, _P],
    "keep_band": [_P, _I64, _F32, _F32, _P],
    "count_equal_magnitudes": [_P, _P, _I64, _F32, _F32, _P],
    "drop_equal_outside": [_P, _P, _I64, _F32, _I64, _I64],
    "uniform_fill": [ctypes.c_uint64, _I64, _I64, _P],
    "dare_abs_partials": [_P, _P, _I64, ctypes.c_uint64, _I64, _F32, _P],
    "combine": [_P, _P, _I64, _P, _P, _P, ctypes.c_int, _F32, _I64, _P],
    "ram_overlap_counts": [_P, _I64, _P, _P, _F32, _I64, _P, _P],
    "ram_combine": [_P, _I64, _P, _P, _F32, _P, _I64, _P],
    "della_rows": [_P, _P, _P, ctypes.c_uint64, _I64, _P, _I64, _I64, _P],
}


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _candidates(name: str) -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distmerge"
    return [HEADER.parent / "__pycache__" / name, user / name]


def _build(compiler: str, target: Path) -> bool:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError:
        return False
    try:
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("could not build the CPU kernels with %s (merges take the torch path): %s", compiler, detail)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built if needed), or None without a working C compiler."""
    sources = b"".join(path.read_bytes() for path in [*SOURCES, HEADER])
    digest = hashlib.sha256(sources + " ".join(FLAGS).encode()).hexdigest()[:16]
    name = f"distmerge_kernels-{digest}.so"
    paths = _candidates(name)
    existing = next((p for p in paths if p.exists()), None)
    if existing is None:
        compiler = _compiler()
        if compiler is None:
            log.warning("no C compiler found: merges take the torch path (same bytes, slower)")
            return None
        existing = next((p for p in paths if _build(compiler, p)), None)
        if existing is None:
            return None
    lib = ctypes.CDLL(str(existing))  # ctypes releases the GIL during calls: block threads run in parallel
    for function, argtypes in _SIGNATURES.items():
        getattr(lib, function).argtypes = argtypes
    lib.della_rows.restype = ctypes.c_int
    lib.combine.restype = ctypes.c_int
    lib.bin_histogram.restype = ctypes.c_int64
    return lib
