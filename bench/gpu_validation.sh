#!/usr/bin/env bash
# One-call validation of the triton and cuda backends on a CUDA machine, from the repository root:
#
#   bash bench/gpu_validation.sh            # tests, then the benchmarks (quick grid)
#   bash bench/gpu_validation.sh tests      # only the tests (compiled kernels, bf16 included)
#   bash bench/gpu_validation.sh bench      # only the benchmarks
#   bash bench/gpu_validation.sh sass       # only both backends' resources, ptxas -v and SASS
#   FULL=1 bash bench/gpu_validation.sh     # the benchmarks' full `--preset gpu` grid (long)
#
# Everything goes to bench/results/<NAME>* (NAME defaults to gpu-<date>): the pytest log, the
# masked_reset_linear + TicketSearch.step CSV/markdown, the subset_metrics CSV/markdown, the cuda
# extension's JIT build log, both backends' kernel resources, `-Xptxas -v` reports and SASS.
# Nothing here has been run yet on a GPU by the session that wrote it (it had none): expect
# first-run fixes, and record the numbers only from an actual run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

what=${1:-all}
name=${NAME:-gpu-$(date +%F)}
out=bench/results
mkdir -p "$out"
# The checkout itself, whether or not it is pip-installed here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Compiled kernels, not the interpreter (tests/conftest.py only sets a default of 1).
export TRITON_INTERPRET=0
status=0

python - <<'EOF' || exit 2
import importlib, sys
import torch
missing = [m for m in ("triton", "numpy", "tqdm", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_validation: missing modules {missing}")
if not torch.cuda.is_available():
    sys.exit("gpu_validation: torch.cuda.is_available() is False")
import triton, bingo_kernels as bk
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}; "
      f"backends {bk.available_backends()}; auto on cuda -> {bk.resolve_backend('auto', 'cuda')}")
print(f"cuda backend: {bk.unavailable_reason('cuda') or 'available'}")
EOF

if [ "$what" = all ] || [ "$what" = tests ] || [ "$what" = bench ]; then
  # The cuda backend's JIT build (ninja, sm_XY of this device: sm_90 on H100/H200), once, before
  # anything uses it, so that a build failure shows here with its log rather than as skips.
  python - <<'EOF' 2>&1 | tee "$out/$name-cuda-build.log"
import time
import bingo_kernels as bk
from bingo_kernels import cuda
from bingo_kernels.cuda import build
if bk.unavailable_reason("cuda") is not None:
    print(f"cuda backend unavailable: {bk.unavailable_reason('cuda')}")
else:
    t0 = time.perf_counter()
    cuda.extension()
    flags = build.NVCC_FLAGS + build.arch_flags()
    print(f"cuda extension ready in {time.perf_counter() - t0:.1f} s (nvcc flags {flags}; "
          f"cache {build.cache_dir(flags)})")
EOF
fi

if [ "$what" = all ] || [ "$what" = tests ]; then
  # test_accelerated_kernels: every triton and cuda kernel on CUDA tensors vs float64 and the
  # torch backend (cuda also vs triton: all three must agree), fp32 / fp16 / bf16 (+ fp64 for
  # cuda), masks bit for bit, TicketSearch(backend=...) == backend="torch".
  # test_triton_kernels: opcheck of the CUDA registration, backend="auto" dispatch, launch proof.
  # test_cuda_ext: the JIT build and registration. test_triton_aot: the compiled code's facts
  # (tensor cores, no TF32, no spills). test_kernel_ops / test_search: the CPU contracts still
  # hold with the CUDA kernels registered; test_linear_metrics: the fused op.
  python -m pytest -q -p no:cacheprovider tests/test_accelerated_kernels.py \
    tests/test_triton_kernels.py tests/test_cuda_ext.py tests/test_triton_aot.py \
    tests/test_kernel_ops.py tests/test_linear_metrics.py tests/test_search.py -ra 2>&1 \
    | tee "$out/$name-tests.log"
  status=${PIPESTATUS[0]}
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  if [ "${FULL:-0}" = 1 ]; then
    op_grid=() search_grid=()
  else  # a slice of the gpu presets that fits in a few minutes (first calls autotune)
    op_grid=(--layers 784x300 4096x4096 --subsets 16 256 --batches 256)
    search_grid=(--subsets 64 256 --batches 256)
  fi
  python bench/bench_masked_reset_linear.py --preset gpu --device cuda --name "$name" \
    "${op_grid[@]}" || status=1
  python bench/bench_search.py --preset gpu --device cuda --name "$name" --append \
    "${search_grid[@]}" || status=1
  python bench/bench_subset_metrics.py --preset gpu --device cuda --name "$name-metrics" \
    || status=1
fi

if [ "$what" = all ] || [ "$what" = sass ]; then
  # For the "where is cuda slower than triton, and why" analysis: registers, spills, shared
  # memory and SASS instruction counts (wgmma/HMMA/FFMA, cp.async, spills) of every kernel of
  # both backends compiled for this device (bench/kernel_resources.py: the same table CI makes
  # for sm_90 without a GPU), each kernel's SASS and the cuda sources' -Xptxas -v reports, plus
  # the SASS of the Triton kernels this run actually compiled (from Triton's cache: the
  # specialisations a real launch adds).
  arch=$(python -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
  sass="$out/$name-sass"
  mkdir -p "$sass"
  python bench/kernel_resources.py --arch "$arch" --name "$name-resources" --sass-dir "$sass" \
    || status=1
  cuobjdump=$(python -c "from bingo_kernels import cubin; print(cubin.cuobjdump_path())") \
    || { echo "gpu_validation: cuobjdump not found: no SASS of the cached Triton kernels"; status=1; }
  cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
  if [ -n "${cuobjdump:-}" ]; then
    find "$cache" -name '*.cubin' 2>/dev/null | while read -r cubin; do
      dir=$(basename "$(dirname "$cubin")")
      "$cuobjdump" -sass "$cubin" > "$sass/cached-$(basename "$cubin" .cubin)-${dir:0:8}.sass" 2>&1
    done
  fi
  echo "resources: $out/$name-resources.md; SASS and ptxas reports: $sass/"
fi
exit "$status"
