"""Where runs live: a local directory or an S3 bucket (`s3://bucket/prefix`)."""
