"""Load analysis: pure metrics (metrics.py) and plots (plots.py, the only matplotlib importer)."""
