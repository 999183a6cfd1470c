export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 220 python -m pytest -m gpu -q -p no:logging tests/test_cast_kernel.py tests/test_gpu.py 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | head -30 | tee $OUT/gpu_tests.txt
timeout 360 python scripts/bench_linear.py --recipes tensorwise tensorwise/torch delayed delayed/torch --shapes 4096x4096 4096x14336 14336x4096 8192x8192 --no-torchao --out $OUT/bench_linear.json 2>&1 | grep -v Warning | tail -20
