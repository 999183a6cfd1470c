set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv
timeout 330 python -m pytest -m gpu -q -p no:logging tests/ 2>&1 | tail -40 | tee $OUT/gpu_tests.txt
timeout 250 python scripts/diag/cast_kernels.py --triton 2>&1 | tee $OUT/cast_diag.txt
