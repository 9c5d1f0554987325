"""Load tests and decode benchmarks against a running gateway."""
