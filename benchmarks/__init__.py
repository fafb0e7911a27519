"""Benchmark suite for checkpointio: ``python benchmarks/run.py [--quick]`` (see README.md here)."""
