"""Built-in benchmarks that generate their own data: ``reasoning`` (verifiable arithmetic, see
docs/REASONING_BENCHMARK.md)."""
