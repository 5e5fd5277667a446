"""Benchmarks: `python -m hvd_megdet.bench.<name>`; each prints a table and writes JSON."""
