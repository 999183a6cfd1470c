export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python -m pytest -m gpu -q -p no:logging tests/test_cast_kernel.py tests/test_gpu.py 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | head -30 | tee $OUT/gpu_tests.txt
timeout 150 python scripts/bench_linear.py --eager --recipes tensorwise/triton tensorwise/torch delayed/triton delayed/torch --shapes 4096x4096 8192x8192 2048x8192 --no-torchao --out $OUT/bench_linear_eager.json 2>&1 | grep -v Warning | tail -8
timeout 200 python scripts/bench_train.py --eager --recipes tensorwise/triton tensorwise/torch --warmup 3 --steps 6 --out $OUT/bench_train_eager.json 2>&1 | grep -v Warning | tail -6
