#!/usr/bin/env bash
# One-call validation of the triton backend on a CUDA machine, from the repository root:
#
#   bash bench/gpu_validation.sh            # tests, then the benchmarks (quick grid)
#   bash bench/gpu_validation.sh tests      # only the tests (compiled kernels, bf16 included)
#   bash bench/gpu_validation.sh bench      # only the benchmarks
#   FULL=1 bash bench/gpu_validation.sh     # the benchmarks' full `--preset gpu` grid (long)
#
# Everything goes to bench/results/<NAME>* (NAME defaults to gpu-<date>): the pytest log, the
# masked_reset_linear + TicketSearch.step CSV/markdown, the subset_metrics CSV/markdown.
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
EOF

if [ "$what" = all ] || [ "$what" = tests ]; then
  # test_triton_kernels: every kernel vs float64 and the torch backend on CUDA tensors (fp32,
  # fp16, bf16), masks bit for bit, TicketSearch(backend="triton") == backend="torch" on CUDA,
  # opcheck of the CUDA registration, backend="auto" dispatch. test_kernel_ops / test_search:
  # the CPU contracts still hold with the CUDA kernels registered.
  python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_kernel_ops.py \
    tests/test_search.py -ra 2>&1 | tee "$out/$name-tests.log"
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
exit "$status"
