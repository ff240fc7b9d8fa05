"""setuptools entry point. Metadata lives in pyproject.toml.

The C++/CUDA extension in csrc/ (the ``cuda`` backend) is normally built just in time, on its first
use (``bingo_kernels/cuda/build.py``): ``pip install -e .`` stays a pure-Python install that works
with the CPU-only torch and build isolation. An ahead-of-time build is opt-in, because it needs a
CUDA torch *in the build environment* (build isolation would install a fresh, multi-GB one)::

    BINGO_BUILD_CUDA=1 pip install --no-build-isolation -e .

It builds ``bingo_kernels.cuda._C`` with ninja for ``TORCH_CUDA_ARCH_LIST`` (default here:
"8.0;9.0", i.e. sm_80 and sm_90 for Hopper) and the JIT build is then skipped.
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("BINGO_BUILD_CUDA") == "1":
    import importlib.util

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # Sources and flags come from the JIT builder (loaded by path: stdlib + torch only), so the two
    # builds cannot drift apart.
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "_bingo_cuda_build", os.path.join(here, "bingo_kernels", "cuda", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules.append(CUDAExtension(
        build.AOT_MODULE, sources=[os.path.relpath(p, here) for p in build.sources()],
        include_dirs=[str(build.CSRC)],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS}))
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
