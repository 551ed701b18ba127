"""LoRAMux benchmarks: each module is one entry point (`python -m bench.engine`, ...).

Every benchmark measures LoRAMux side by side with its baselines in one process and one
run (repetitions interleaved across configurations), prints a table, and writes JSON and
a PNG plot under bench/results/. docs/performance.md quotes the latest numbers.
"""
