"""Benchmarks: ``python -m pretrain.bench NAME``; each prints a table and a last ``ratio`` line."""
