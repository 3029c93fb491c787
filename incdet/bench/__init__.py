"""Layer 7: benchmarks (never timed tests), one module per section of tools/benchmark.py."""
