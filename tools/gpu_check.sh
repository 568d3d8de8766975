#!/usr/bin/env bash
# The GPU checks of issue 7, as one call on a lent device machine (see the device tool):
# build the extension in place with the machine's own python (and the CUDA checksum module
# where that machine has nvcc; otherwise carry async_ckpt/_cuda_crc*.so built here), run the
# CUDA tests (and the snapshot/manager tests beside them), then the GPU stall benchmark. The
# device image runs its own python3 and packages: if pybind11 is missing there, carry its
# wheel (`pip download pybind11 -d wheels` here, `carry: ["wheels"]`, and
# `pip install --no-index wheels/*` first).
#
#   run: bash tools/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
command -v nvcc && nvcc --version | tail -1 || echo "no nvcc: using a carried CUDA module if any"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
ASYNC_CKPT_CUDA_ARCHS="${ASYNC_CKPT_CUDA_ARCHS:-90}" python3 setup.py -q build_ext --inplace
ls async_ckpt/_cuda_crc*.so || true
python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_device_crc.py \
    tests/test_device_copy.py tests/test_lazy.py tests/test_gate.py tests/test_manager.py
python3 -m benchmarks.bench_gpu --gib "${GIB:-4}" --repeat "${REPEAT:-3}"
