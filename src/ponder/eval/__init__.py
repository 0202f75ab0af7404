"""Metrics, timing, sweeps and reports."""
