"""Getting the compiled extension: a prebuilt one (ahead of time, opt-in) or a JIT build.

* Ahead of time: ``BINGO_BUILD_CUDA=1 pip install --no-build-isolation -e .`` builds
  ``bingo_kernels.cuda._C`` with setup.py (needs a CUDA torch in the build environment, which
  build isolation would not have; hence opt-in). Used first when present.
* Just in time (the default): ``torch.utils.cpp_extension.load`` with ninja on the first call of
  a ``backend="cuda"`` op, into a cache directory keyed by a digest of the sources, flags and
  toolchain (``$BINGO_CUDA_CACHE``, else ``$XDG_CACHE_HOME/bingo_kernels`` or
  ``~/.cache/bingo_kernels``), so later processes load the built module in well under a second.
  The target is the current device's architecture (``-gencode arch=compute_XY,code=sm_XY``: sm_90
  on H100/H200), or ``TORCH_CUDA_ARCH_LIST`` when set. A failed build writes the compiler output
  to ``build.log`` in that directory and the error names it.

Nothing here runs on import of :mod:`bingo_kernels`: only :func:`extension` builds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
AOT_MODULE = "bingo_kernels.cuda._C"
# Flags shared by the JIT build, setup.py and the CI compile check (tests/test_cuda_ext.py).
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]


def sources() -> list[Path]:
    """The extension's sources: the pybind11 binding and every kernel file."""
    return [CSRC / "binding.cpp", *sorted((CSRC / "kernels").glob("*.cu"))]


def cuda_home() -> Optional[str]:
    """The CUDA toolkit to build with: CUDA_HOME / CUDA_PATH, else the toolkit of the nvcc on PATH,
    else /usr/local/cuda; None if there is no nvcc. A toolkit is a directory with bin/nvcc and
    include/cuda_runtime.h (an nvcc on PATH may be a wrapper script outside the toolkit)."""
    def toolkit(path) -> bool:
        return bool(path) and (Path(path) / "bin" / "nvcc").exists() and (
            Path(path) / "include" / "cuda_runtime.h").exists()

    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if toolkit(candidate):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc and toolkit(Path(nvcc).resolve().parent.parent):
        return str(Path(nvcc).resolve().parent.parent)
    if toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def aot_available() -> bool:
    """Whether an ahead-of-time build of the extension is installed (checked without importing)."""
    try:
        return importlib.util.find_spec(AOT_MODULE) is not None
    except (ImportError, ValueError):
        return False


def arch_flags() -> list[str]:
    """nvcc target flags: the current device's sm_XY, unless TORCH_CUDA_ARCH_LIST is set (then
    torch's own handling of that variable applies and we add nothing)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    major, minor = torch.cuda.get_device_capability()
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def cache_dir(flags: list[str]) -> Path:
    """Build directory keyed by the sources, flags and toolchain (a stale build is never reused)."""
    root = os.environ.get("BINGO_CUDA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bingo_kernels")
    digest = hashlib.sha256()
    for path in [*sources(), CSRC / "bingo_cuda.h", CSRC / "bingo_hash.cuh",
                 *sorted((CSRC / "kernels").glob("*.cuh"))]:
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join([*flags, torch.__version__, str(torch.version.cuda),
                            os.environ.get("TORCH_CUDA_ARCH_LIST", "")]).encode())
    return Path(root) / f"cuda_ext_{digest.hexdigest()[:16]}"


class BuildFailed(RuntimeError):
    """The JIT build failed; ``log`` is the file holding the compiler output."""

    def __init__(self, log: Path, summary: str):
        super().__init__(f"building the C++/CUDA extension failed ({summary}); compiler output "
                         f"in {log}")
        self.log = log


def extension():
    """The compiled module: the AOT build if installed, else a (cached) JIT build."""
    if aot_available():
        return importlib.import_module(AOT_MODULE)
    # torch.utils.cpp_extension reads CUDA_HOME when imported and, without it, guesses from the
    # nvcc on PATH, which may be a wrapper script outside the toolkit: point it at the toolkit.
    if not os.environ.get("CUDA_HOME") and cuda_home():
        os.environ["CUDA_HOME"] = cuda_home()
    from torch.utils import cpp_extension  # noqa: PLC0415  (slow import, only when building)

    flags = NVCC_FLAGS + arch_flags()
    build_dir = cache_dir(flags)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    try:
        return cpp_extension.load(
            name="bingo_cuda_ext", sources=[str(s) for s in sources()],
            extra_include_paths=[str(CSRC)], extra_cflags=CXX_FLAGS, extra_cuda_cflags=flags,
            build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # noqa: BLE001  (any failure: keep the output, name the log)
        log.write_text(f"{type(exc).__name__}: {exc}\n")
        first = next((line for line in str(exc).splitlines() if "error" in line.lower()),
                     type(exc).__name__)
        raise BuildFailed(log, first.strip()[:200]) from exc
