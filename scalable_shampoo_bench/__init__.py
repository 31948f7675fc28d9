"""shampoo-bench: Shampoo against AdamW (and SGD) on small real workloads; see ``scalable_shampoo_bench.cli``."""
