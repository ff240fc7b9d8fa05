"""Session-wide test setup.

``TRITON_INTERPRET=1`` makes the triton backend's kernels run in Triton's CPU interpreter, which
is how CI (no GPU) tests them. ``triton.jit`` reads the variable when a kernel module is
imported, and bingo_kernels imports its kernel modules only on first use, so setting it here,
before any test module is collected, is early enough. ``setdefault``: a GPU run that wants the
compiled kernels sets ``TRITON_INTERPRET=0`` explicitly (bench/gpu_validation.sh does).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
