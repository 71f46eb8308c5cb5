"""Side-by-side benchmarks of deltatune and peft (see bench/harness.py and docs/benchmarks.md)."""
