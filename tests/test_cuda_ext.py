"""The cuda backend (csrc/, bingo_kernels/cuda/): what can be checked without a GPU.

Without a GPU (CI): nvcc compiles every ``csrc/**/*.cu`` for sm_90 and sm_80 (warnings are
errors), g++ syntax-checks the pybind11 binding against torch's headers, a host program built from
the kernels' own hash header (``csrc/bingo_hash.cuh``) reproduces :mod:`bingo_kernels.hashing` bit
for bit on fresh random cases, and the backend's registration, unavailability messages, build
failure reporting and Python-side composition are checked. These skip, naming what is missing,
where nvcc or g++ is absent.

With a CUDA device (``bash bench/gpu_validation.sh``): the extension is built (JIT) and every
kernel is compared with a float64 oracle, the torch backend and, where available, the triton
backend (all three must agree), fp32 / fp16 / bf16 / fp64, masks bit for bit: that suite is
shared with the triton backend, in test_accelerated_kernels.py (here its cases skip, naming why).
"""

import os
import random
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import bingo_kernels as bk
from bingo_kernels import BackendUnavailableError, SubsetMasks, reference, subset_mask
from bingo_kernels import cuda as bkc
from bingo_kernels.cuda import build
from kernel_helpers import generator

CSRC = build.CSRC
CUDA_HOME = build.cuda_home()
NVCC = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME / PATH)")
# Compile-check targets: Hopper, and one older architecture (CUDA 13 supports sm_75+; the kernels
# need sm_80+ for bf16 tensor cores).
ARCHS = ("90", "80")


# --- compile checks (no GPU) ----------------------------------------------------------------------

@needs_nvcc
def test_nvcc_compiles_every_cu_file(tmp_path):
    """Every kernel file compiles (-c) for sm_90 and sm_80, warnings as errors, in parallel."""
    files = sorted(CSRC.rglob("*.cu"))
    assert files, f"no .cu files under {CSRC}"
    jobs = [(f, arch) for f in files for arch in ARCHS]

    def compile_one(job):
        source, arch = job
        cmd = [NVCC, *build.NVCC_FLAGS, "-Werror", "all-warnings", f"-I{CSRC}",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(source),
               "-o", str(tmp_path / f"{source.stem}_sm{arch}.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        return job, done

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, jobs))
    failures = [f"{src.relative_to(CSRC)} sm_{arch}:\n{done.stderr[-3000:]}"
                for (src, arch), done in results if done.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    print(f"compiled {len(jobs)} (file, arch) pairs in {time.perf_counter() - started:.1f} s")


def _torch_cuda_header_shim(tmp_path) -> list[str]:
    """The CPU torch wheel ships c10/cuda headers but not the one CMake generates for them
    (``c10/cuda/impl/cuda_cmake_macros.h``, which only defines C10_CUDA_BUILD_SHARED_LIBS)."""
    from torch.utils.cpp_extension import include_paths  # noqa: PLC0415

    flags = [f"-isystem{p}" for p in include_paths()]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / generated).exists() for p in include_paths()):
        shim = tmp_path / "shim" / generated
        shim.parent.mkdir(parents=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags.append(f"-isystem{tmp_path / 'shim'}")
    return flags


@needs_nvcc
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_binding_compiles_against_torch_headers(tmp_path):
    """Syntax-only check of csrc/binding.cpp (pybind11 + torch), with our warnings as errors."""
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           *_torch_cuda_header_shim(tmp_path), f"-isystem{sysconfig.get_paths()['include']}",
           f"-isystem{Path(CUDA_HOME) / 'include'}", f"-I{CSRC}",
           "-DTORCH_EXTENSION_NAME=_C", str(CSRC / "binding.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


# --- the hash, bit for bit, on the host ----------------------------------------------------------

def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _hash_cases(rng: random.Random):
    """Fresh random cases: unit offsets past 2**32, across a 2**32 boundary and past 2**63 (the
    spec's unit index is uint64), subset indices that wrap mod 2**32, scalar and per-unit
    probabilities (with exact 0 and 1 entries)."""
    u32 = lambda: rng.randrange(2**32)  # noqa: E731
    cases = [
        (u32(), u32(), u32(), 5, rng.randrange(2**20), 300, rng.random()),
        (u32(), u32(), 2**32 - 3, 6, 2**32 - 150, 300, rng.random()),  # k and units wrap
        (u32(), u32(), u32(), 4, rng.randrange(2**32, 2**50), 257, "per-unit"),
        (u32(), u32(), u32(), 3, 3 * 2**32 - 1, 129, rng.random()),      # carry into hi32
        (u32(), u32(), u32(), 3, 2**63 - 100, 300, rng.random()),        # past int64
        (u32(), u32(), u32(), 3, 2**64 - 129, 129, rng.random()),        # last uint64 indices
        (u32(), u32(), 0, 2, 0, 64, 0.0), (u32(), u32(), 0, 2, 0, 64, 1.0),
    ]
    for seed, search, k_start, K, offset, U, p in cases:
        if p == "per-unit":
            prob = torch.rand(U, generator=torch.Generator().manual_seed(seed))
            prob[:8], prob[8:16] = 0.0, 1.0
        else:
            prob = float(torch.tensor(p, dtype=torch.float32))
        yield seed, search, k_start, K, offset, U, prob


def _compile_hash_program(compiler: str, out: Path) -> None:
    source = CSRC / "tools" / "hash_masks.cpp"
    if compiler == "nvcc":  # -x cu: the header's __host__ __device__ variant
        cmd = [NVCC, "-std=c++17", "-x", "cu", str(source), "-o", str(out)]
    else:
        cmd = ["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", str(source), "-o",
               str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("compiler", [
    pytest.param("nvcc", marks=needs_nvcc),
    pytest.param("g++", marks=pytest.mark.skipif(shutil.which("g++") is None,
                                                 reason="g++ not found"))])
def test_cuda_hash_header_matches_spec_bit_for_bit(compiler, tmp_path):
    run_seed = random.SystemRandom().randrange(2**63)
    program = tmp_path / "hash_masks"
    _compile_hash_program(compiler, program)
    cases = list(_hash_cases(random.Random(run_seed)))
    lines = []
    for seed, search, k_start, K, offset, U, prob in cases:
        p = ("u " + " ".join(str(_f32_bits(v)) for v in prob.tolist())
             if isinstance(prob, torch.Tensor) else f"s {_f32_bits(prob)}")
        lines.append(f"{seed} {search} {k_start} {K} {offset} {U} {p}")
    done = subprocess.run([str(program)], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, check=True)
    blocks = done.stdout.split("end\n")
    assert len(blocks) == len(cases) + 1 and blocks[-1] == "", done.stdout[-500:]
    for case, block in zip(cases, blocks):
        seed, search, k_start, K, offset, U, prob = case
        got = torch.tensor([[c == "1" for c in row] for row in block.split()], dtype=torch.bool)
        want = subset_mask(seed, search, k_start, K, offset, U, prob)
        assert torch.equal(got, want), (f"{compiler} hash differs for seed={seed} search={search} "
                                        f"k_start={k_start} offset={offset} (run seed {run_seed})")


# --- registration and availability (no GPU) ------------------------------------------------------

def test_registered_with_one_signature_and_auto_prefers_triton(monkeypatch):
    assert bk.backends.AUTO_PREFERENCE[0] == "triton"
    assert bk.backends.supported_devices("cuda") == ("cuda",)
    registered = bk.backends._BACKENDS
    assert set(registered["cuda"].ops) == set(bk.backends.OP_NAMES) - {"masked_reset_conv2d"}
    for name in ("triton", "cuda"):
        monkeypatch.setattr(registered[name], "unavailable_reason", lambda: None)
        monkeypatch.setattr(registered[name], "devices", ("cuda",))
    assert bk.resolve_backend("auto", "cuda") == "triton"
    assert bk.resolve_backend("cuda", "cuda") == "cuda"
    monkeypatch.setattr(registered["triton"], "unavailable_reason", lambda: "not installed")
    assert bk.resolve_backend("auto", "cuda") == "cuda"
    with pytest.raises(BackendUnavailableError, match="cuda.*masked_reset_conv2d"):
        bk.backends.backend_op("cuda", "masked_reset_conv2d")


def test_unavailable_here_says_exactly_why(monkeypatch):
    """Each missing piece is named, in the order a user has to fix them."""
    monkeypatch.setattr(bkc, "_BUILD_ERROR", None)
    monkeypatch.setattr(bkc, "_EXTENSION", None)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "built without CUDA" in bk.unavailable_reason("cuda")
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(BackendUnavailableError, match="cuda.*built without CUDA"):
        bk.masked_reset_linear(x, w, None, None, None, SubsetMasks(0, 0, 0, 2, 0, 0.5),
                               backend="cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in bk.unavailable_reason("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert "compute capability 7.5" in bk.unavailable_reason("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(build, "aot_available", lambda: False)
    monkeypatch.setattr(build, "cuda_home", lambda: None)
    assert "nvcc not found" in bk.unavailable_reason("cuda")
    monkeypatch.setattr(build, "cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.setattr(bkc.shutil, "which", lambda name: None)
    assert "ninja" in bk.unavailable_reason("cuda")
    monkeypatch.setattr(bkc.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert bk.unavailable_reason("cuda") is None
    # Still on CPU tensors: the backend exists but says it takes CUDA tensors only.
    with pytest.raises(BackendUnavailableError, match="does not run on cpu"):
        bk.masked_reset_linear(x, w, None, None, None, SubsetMasks(0, 0, 0, 2, 0, 0.5),
                               backend="cuda")


def test_build_failure_names_the_log_and_is_remembered(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(bkc, "_BUILD_ERROR", None)
    monkeypatch.setattr(bkc, "_EXTENSION", None)
    monkeypatch.setattr(bkc, "unavailable_reason",
                        lambda: bkc._BUILD_ERROR)  # as if every cheap check passed
    monkeypatch.setattr(build, "aot_available", lambda: False)
    monkeypatch.setattr(build, "arch_flags", lambda: ["-gencode=arch=compute_90,code=sm_90"])
    monkeypatch.setenv("BINGO_CUDA_CACHE", str(tmp_path))

    def failing_load(**kwargs):
        assert kwargs["build_directory"].startswith(str(tmp_path))
        assert "-gencode=arch=compute_90,code=sm_90" in kwargs["extra_cuda_cflags"]
        raise RuntimeError("ninja: build stopped\nlinear.cu(12): error: identifier \"oops\"")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(BackendUnavailableError, match=r"failed.*error: identifier.*build\.log"):
        bkc.extension()
    log = Path(str(bkc._BUILD_ERROR).rsplit(" ", 1)[-1])
    assert log.parent.parent == tmp_path and "identifier \"oops\"" in log.read_text()
    assert "build.log" in bkc.unavailable_reason()  # remembered: no second build attempt
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("rebuilt"))
    with pytest.raises(BackendUnavailableError, match="build.log"):
        bkc.extension()


def test_cache_directory_follows_the_sources_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("BINGO_CUDA_CACHE", str(tmp_path))
    a = build.cache_dir(["-gencode=arch=compute_90,code=sm_90"])
    assert a == build.cache_dir(["-gencode=arch=compute_90,code=sm_90"])
    assert a != build.cache_dir(["-gencode=arch=compute_80,code=sm_80"])
    assert a.parent == tmp_path


def test_importing_bingo_never_builds_the_extension():
    code = ("import sys, bingo, bingo_kernels; bad = [m for m in sys.modules if "
            "m.startswith('torch.utils.cpp_extension') or m.endswith('cuda._C') or "
            "m == 'bingo_cuda_ext']; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_kernel_falls_back_to_torch_with_a_warning(monkeypatch):
    """Where triton is absent the custom ops' CUDA kernel is this backend's; a failed build must
    not break backend="auto"."""
    def broken(*args):
        raise BackendUnavailableError("backend 'cuda' is unavailable: build failed (log: x)")

    monkeypatch.setattr(bkc, "unavailable_reason", lambda: None)
    monkeypatch.setitem(bkc.OPS, "subset_metrics", broken)
    logits, targets = torch.randn(3, 5, 4), torch.randint(0, 4, (5,))
    with pytest.warns(RuntimeWarning, match="build failed"):
        got = bkc._auto_kernel("subset_metrics")(logits, targets, -100)
    want = reference.subset_metrics(logits, targets, -100)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_linear_metrics_composition_blocks_subsets(monkeypatch, explicit, shared):
    """subset_linear_metrics = masked_reset_linear + subset_metrics per block of subsets; checked
    here with the torch ops standing in for the extension and blocks of 2 subsets, k_start near
    2**32 (wraps inside the op)."""
    seed, g = generator()
    K, B, IN, C = 5, 6, 7, 9
    monkeypatch.setattr(bkc, "_LOGIT_ELEMENTS", 2 * B * C)
    monkeypatch.setattr(bkc, "masked_reset_linear", reference.masked_reset_linear)
    monkeypatch.setattr(bkc, "subset_metrics", reference.subset_metrics)
    h = torch.randn((B, IN) if shared else (K, B, IN), generator=g)
    w, w0, b, b0 = (torch.randn(C, IN, generator=g), torch.randn(C, IN, generator=g),
                    torch.randn(C, generator=g), torch.randn(C, generator=g))
    targets = torch.randint(0, C, (B,), generator=g)
    targets[0] = -100
    masks = (torch.rand(K, C, generator=g) < 0.4 if explicit
             else SubsetMasks(seed, 2, 2**32 - 3, K, 11, 0.3, "neuron"))
    args = bk.ops._mask_args(masks, C, C, h.device)
    flat = (args["explicit_masks"], args["prob"], args["prob_scalar"], args["seed"],
            args["search"], args["k_start"], args["num_subsets"], args["unit_offset"],
            args["granularity"], -100, 0)
    got = bkc.subset_linear_metrics(h, w, w0, b, b0, targets, *flat)
    want = reference.subset_linear_metrics(h, w, w0, b, b0, targets, *flat)
    assert torch.allclose(got[0], want[0], atol=1e-5), f"seed {seed}"
    assert torch.equal(got[1], want[1]), f"seed {seed}"
