"""Launching training: one run end to end, and sweeps on Ray."""
