"""The benchmarks of bench.py, one module per command."""
