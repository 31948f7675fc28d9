"""shampoo-bench: Shampoo against AdamW (and SGD) on small real workloads; see ``benchmarks.cli``."""
