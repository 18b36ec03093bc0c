"""The compose S3 cluster's credentials and bucket (docker/compose-s3.yaml), run on the host.

  s3-setup.py secrets DIR                 random credentials, made once: DIR/credentials (an AWS
                                          shared-credentials file) and DIR/identities.json (SeaweedFS's)
  s3-setup.py bucket DIR BUCKET ENDPOINT  wait for the server, then create the bucket (if missing)
"""

from __future__ import annotations

import configparser
import json
import os
import secrets
import sys
import time
from pathlib import Path


def make_secrets(directory: Path) -> None:
    if (directory / "credentials").exists() and (directory / "identities.json").exists():
        return
    os.umask(0o077)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key, secret = f"lilgatsby-{secrets.token_hex(8)}", secrets.token_hex(32)
    (directory / "credentials").write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    identity = {"name": "lilgatsby", "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    (directory / "identities.json").write_text(json.dumps({"identities": [identity]}))


def create_bucket(directory: Path, bucket: str, endpoint: str, timeout_s: float = 120) -> None:
    import boto3

    profile = configparser.ConfigParser()
    profile.read(directory / "credentials")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=profile["default"]["aws_access_key_id"],
                          aws_secret_access_key=profile["default"]["aws_secret_access_key"])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            print(f"created the bucket {bucket} on {endpoint}")
            return
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            return
        except Exception as e:  # noqa: BLE001 - the server is still starting
            if time.monotonic() > deadline:
                sys.exit(f"s3-setup: the S3 server at {endpoint} did not answer in {timeout_s:.0f} s: {e}")
            time.sleep(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["secrets"] and len(sys.argv) == 3:
        make_secrets(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["bucket"] and len(sys.argv) == 5:
        create_bucket(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
