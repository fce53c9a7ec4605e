"""The fake-CUDA shim: a tiny C++ library that lets a CPU-only torch build run autograd on fake "cuda" tensors.

It registers (1) a no-op device guard for CUDA (c10::impl::FakeGuardImpl) and (2) CUDA hooks whose hasCUDA() /
isAvailable() are true, so that the autograd engine and at::accelerator accept fake CUDA tensors. No CUDA code is
ever run: every op goes through FakeTensorMode's meta kernels. torch reads the CUDA hooks once, when torch._C
initialises, so the library must be loaded before torch: the trace worker runs in a subprocess with LD_PRELOAD.

Built with torch.utils.cpp_extension.load_inline (needs a C++ compiler, ninja and the headers that every torch
wheel ships), once per torch version, and cached under $XDG_CACHE_HOME/qlora-bench/fakecuda-<torch version>/
(QLORA_BENCH_SHIM_DIR overrides the folder). The build runs in its own process: loading the library would change
the calling process's torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import InputError

SHIM_DIR_ENV = "QLORA_BENCH_SHIM_DIR"
NAME = "qlora_bench_fakecuda"

# Only the two registrations; no torch/extension.h (no pybind11, no Python headers): builds in ~2 s instead of ~25 s.
SOURCE = r"""
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace {
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
}

namespace qlora_bench_fakecuda {
struct CUDAHooks : public at::CUDAHooksInterface {
  CUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex current_device() const override { return 0; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
};
using at::CUDAHooksRegistry;
using at::RegistererCUDAHooksRegistry;
REGISTER_CUDA_HOOKS(CUDAHooks);
}  // namespace qlora_bench_fakecuda
"""

_BUILD = """
import sys
from torch.utils.cpp_extension import load_inline
load_inline(name=sys.argv[2], cpp_sources=[sys.argv[3]], functions=None, build_directory=sys.argv[1],
            extra_cflags=["-O1"], is_python_module=False, no_implicit_headers=True, verbose=False)
"""


def _torch_info() -> tuple[str, Path]:
    """(torch version, torch's lib folder) without importing torch (importing it costs seconds)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("trace needs torch: pip install 'qlora-bench[train]' (install torch first for your platform)")
    root = Path(next(iter(spec.submodule_search_locations)))
    return importlib.metadata.version("torch"), root


def cache_dir() -> Path:
    env = os.environ.get(SHIM_DIR_ENV)
    if env:
        return Path(env)
    version, _ = _torch_info()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qlora-bench" / f"fakecuda-{version}"


def library_path() -> Path:
    # the source's hash in the name: a changed shim is rebuilt, not confused with a cached one
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:10]
    return cache_dir() / f"{NAME}_{digest}" / f"{NAME}.so"


def _compiler() -> str | None:
    """The compiler torch.utils.cpp_extension will call ($CXX, else c++), or g++ in its place."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx):
        return cxx
    return "g++" if shutil.which("g++") else None


def missing_tools() -> list[str]:
    """What a build needs and this machine lacks (empty: it can build)."""
    _, root = _torch_info()
    missing = []
    if _compiler() is None:
        missing.append(f"a C++ compiler ({os.environ.get('CXX', 'c++')} or g++)")
    if shutil.which("ninja") is None and not _has_ninja_module():
        missing.append("ninja (pip install ninja)")
    if not (root / "include" / "ATen" / "detail" / "CUDAHooksInterface.h").is_file():
        missing.append(f"torch's C++ headers ({root / 'include'})")
    return missing


def _has_ninja_module() -> bool:
    import importlib.util

    return importlib.util.find_spec("ninja") is not None


@contextlib.contextmanager
def _lock(folder: Path):
    """One build at a time per cache folder (parallel tests, two shells)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built() -> tuple[Path, float]:
    """The shim's path, building it first if it is not cached. Returns (path, seconds spent building: 0 if cached).
    Raises InputError (one line) when it cannot be built here."""
    lib = library_path()
    if lib.is_file():
        return lib, 0.0
    missing = missing_tools()
    if missing:
        raise InputError(
            f"trace needs to build a small C++ library once and this machine lacks {' and '.join(missing)}; "
            "install them (Debian/Ubuntu: apt install g++ ninja-build) or run `plan` instead"
        )
    t0 = time.perf_counter()
    with _lock(lib.parent.parent):
        if lib.is_file():  # another process built it while we waited
            return lib, 0.0
        lib.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MAX_JOBS": "1", "CXX": _compiler()}
        env.pop("LD_PRELOAD", None)
        r = subprocess.run(
            [sys.executable, "-c", _BUILD, str(lib.parent), NAME, SOURCE],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if r.returncode != 0 or not lib.is_file():
            last = [line for line in (r.stderr or r.stdout).splitlines() if line.strip()][-1:] or ["no output"]
            raise InputError(f"building the fake-CUDA shim in {lib.parent} failed: {last[0][:300]}")
    return lib, time.perf_counter() - t0


def preload_env(lib: Path) -> dict:
    """The environment for the trace worker: the shim preloaded, torch's libraries findable (the shim links to
    libc10 and libtorch_cpu without an rpath, so one cached build serves every venv with this torch version)."""
    _, root = _torch_info()
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(root / "lib"), env.get("LD_LIBRARY_PATH", "")) if p)
    return env
