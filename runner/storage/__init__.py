"""Transport: where bytes live (a local directory or an S3 bucket, behind `location.Location`), how
they move, and the bucket's lease. Nothing here knows what a run is beyond its file names."""
