"""Offline: fitting gates, choosing heads and thresholds, evaluation, plots and data sets. A camera never
imports it (tests/test_package.py checks the layers)."""
