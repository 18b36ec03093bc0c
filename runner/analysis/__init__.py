"""Analysis of recorded runs: dead-token metrics, `compare`, and the report."""
