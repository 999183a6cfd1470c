export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 120 python -m pytest -m gpu -q -p no:logging tests/test_cast_kernel.py 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | head -30 | tee $OUT/gpu_tests.txt
timeout 420 python scripts/bench_train.py --recipes tensorwise tensorwise/torch --warmup 4 --steps 8 --out $OUT/bench_train.json 2>&1 | grep -v Warning | tail -12
