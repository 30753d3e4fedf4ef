"""Simulated peers and load for tests, benchmarks and ``smsbridge dev`` (docs/simulators.md)."""
