"""A training run: the loop, its checkpoints and model snapshots, the process it runs in, its provenance."""
