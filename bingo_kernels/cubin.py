"""Reading compiled GPU code (cubins) on any machine: resource usage and SASS opcode counts.

Used for the kernels of both accelerated backends (Triton's, compiled ahead of time by
:mod:`bingo_kernels.triton.aot`, and the cuda backend's from nvcc), so that registers, spills,
shared memory and the instructions of the inner loops can be compared without a GPU. The tool is
the ``cuobjdump`` bundled with Triton's NVIDIA backend (the CUDA toolkit's where Triton is absent).
Counts are static: instructions in the code, not instructions executed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

OPCODES = {
    "HGMMA": "Hopper warpgroup MMA (wgmma)",
    "HMMA": "tensor-core MMA (mma.sync / WMMA)",
    "FFMA": "fp32 fused multiply-add",
    "DFMA": "fp64 fused multiply-add",
    "LDGSTS": "asynchronous global->shared copy (cp.async)",
    "UTMALDG": "TMA bulk tensor load",
    "LDSM": "shared->register matrix load (ldmatrix)",
    "LDG": "global load",
    "STG": "global store",
    "STL": "local-memory store (a register spill, in kernels without local arrays)",
    "LDL": "local-memory load (a spill reloaded)",
}
"""SASS opcodes :func:`opcode_counts` counts: which units the inner loops use, how data moves."""

RESOURCES = ("REG", "STACK", "LOCAL", "SHARED")
"""What :func:`resource_usage` reports per function: registers per thread, stack-frame bytes per
thread (where ptxas puts spilled registers), local-array bytes per thread, static shared bytes
per block."""

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def cuobjdump_path() -> str:
    """The ``cuobjdump`` bundled with Triton's NVIDIA backend, else the one on PATH or in the
    cuda backend's toolkit; RuntimeError naming where it looked if none is found."""
    candidates = []
    try:
        import triton  # noqa: PLC0415  (optional)

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" /
                          "cuobjdump")
    except ImportError:
        pass
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    from .cuda.build import cuda_home  # noqa: PLC0415  (the toolkit the cuda backend builds with)

    toolkit = cuda_home()
    if toolkit:
        candidates.append(Path(toolkit) / "bin" / "cuobjdump")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise RuntimeError("cuobjdump not found: not in triton's NVIDIA backend, on PATH or in "
                       "the CUDA toolkit's bin (pip install triton ships one)")


def _cuobjdump(binary: bytes, flag: str) -> str:
    tool = cuobjdump_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "code.cubin"
        path.write_bytes(binary)
        done = subprocess.run([tool, flag, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {flag} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def resource_usage(binary: bytes) -> dict[str, dict[str, int]]:
    """Function name (mangled) -> :data:`RESOURCES` as ``cuobjdump -res-usage`` prints them."""
    text = _cuobjdump(binary, "-res-usage")
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(.*)", text):
        found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", fields))
        usage[name] = {key: int(found[key]) for key in RESOURCES if key in found}
    if not usage:
        raise RuntimeError(f"cuobjdump -res-usage listed no function:\n{text[:2000]}")
    return usage


def sass(binary: bytes) -> str:
    """The whole SASS listing (``cuobjdump -sass``)."""
    return _cuobjdump(binary, "-sass")


def sass_functions(listing: str) -> dict[str, str]:
    """Function name (mangled) -> its part of a SASS listing."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", listing, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def opcode_counts(listing: str) -> dict[str, int]:
    """How many instructions of each of :data:`OPCODES` a SASS listing holds (the opcode without
    its modifiers: ``HMMA.16816.F32.BF16`` counts as ``HMMA``)."""
    counts = Counter(_INSTRUCTION.findall(listing))
    return {op: counts.get(op, 0) for op in OPCODES}
