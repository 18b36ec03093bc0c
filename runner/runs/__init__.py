"""Runs on disk: a run directory (manifest, lock, completeness) and the per-experiment index."""
