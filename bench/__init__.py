"""Benchmark of the gateway against a direct connection and nginx, on one machine: `python -m bench`."""
