#!/usr/bin/env bash
# Every GPU check in one call, for a machine with an NVIDIA GPU:
# build the extension in place with the machine's own python (and the CUDA checksum module
# where that machine has nvcc; otherwise copy in an async_ckpt/_cuda_crc*.so built elsewhere), run the
# CUDA tests (and the snapshot/manager tests beside them), then the GPU stall benchmark. It
# uses the machine's own python3 and packages: where pybind11 is missing and there is no
# network, bring its wheel (`pip download pybind11 -d wheels` elsewhere, then
# `pip install --no-index wheels/*` first).
#
#   bash tools/gpu_check.sh 2>&1 | tee gpu_check.log
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
