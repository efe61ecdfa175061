"""The GPU benchmark: `benchmarks/gpu/run.sh` runs `python -m benchmarks.gpu.gpu_bench`."""
