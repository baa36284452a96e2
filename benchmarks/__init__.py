"""Benchmarks: scripts that print tables, write JSON and draw plots. Never run as tests."""
