"""Benchmarks: ``python -m pretrain.bench NAME``; each prints a table and a last ``ratio`` line
comparing vitscale with a baseline measured in the same run."""
