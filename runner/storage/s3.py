"""Objects in an S3 bucket, through boto3: the one module that talks to the server.

Credentials and the endpoint come from the standard AWS chain (environment, `~/.aws`, instance or
pod roles; `AWS_ENDPOINT_URL` for a server that is not AWS): this project has no secrets of its
own. Every failure is a `StorageError` naming the server and the object; `probe` turns the ones a
user can fix (unreachable, credentials, bucket, permission) into one-line `ConfigError`s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runner.errors import ConfigError, UserError
from runner.layout import PROBE_PREFIX
from runner.storage.uri import S3Uri

log = logging.getLogger(__name__)
PART_BYTES = 64 << 20  # multipart part size: large recordings upload as ~15 parallel 64 MiB parts
CONCURRENCY = 4
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
PRECONDITION_FAILED = {"412", "PreconditionFailed", "ConditionalRequestConflict"}


class StorageError(RuntimeError):
    """The server failed a request (after boto3's retries)."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


class AccessDenied(StorageError):
    """These credentials may not do this (e.g. write, with a read-only identity)."""


ACCESS_DENIED = {"AccessDenied", "403"}


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    age_s: float  # since its last write, by the server's clock (its Date header minus Last-Modified)


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class ObjectStore:
    """One S3 client (thread-safe) and what this project does with objects."""

    def __init__(self) -> None:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        config = Config(
            # non-AWS servers (SeaweedFS, MinIO, Ceph) want path-style URLs and no optional checksums
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=60,
            max_pool_connections=2 * CONCURRENCY + 2)
        self.client = session.client("s3", region_name=session.region_name or "us-east-1", config=config)
        self.endpoint = self.client.meta.endpoint_url

    @contextlib.contextmanager
    def _errors(self, action: str, uri: S3Uri | str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            code = _code(e)
            cls = (PreconditionFailed if code in PRECONDITION_FAILED else AccessDenied if code in ACCESS_DENIED
                   else StorageError)
            raise cls(f"S3 server {self.endpoint}: {action} {uri}: {code}: "
                      f"{e.response.get('Error', {}).get('Message', e)}") from e
        except BotoCoreError as e:
            raise StorageError(f"S3 server {self.endpoint}: {action} {uri}: {e}") from e

    # -- reading ---------------------------------------------------------------------------------
    def head(self, uri: S3Uri) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            with self._errors("head", uri):
                response = self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except StorageError as e:
            if isinstance(e.__cause__, ClientError) and _code(e.__cause__) in NOT_FOUND:
                return None
            raise
        from email.utils import parsedate_to_datetime

        server_now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        return ObjectInfo(response["ContentLength"], response["ETag"],
                          (server_now - response["LastModified"]).total_seconds())

    def get_bytes(self, uri: S3Uri, start: int | None = None, stop: int | None = None) -> bytes | None:
        """The object's bytes (or bytes start..stop-1 of it: a ranged read); None when it does not exist."""
        from botocore.exceptions import ClientError

        extra = {"Range": f"bytes={start}-{stop - 1}"} if start is not None and stop is not None else {}
        try:
            with self._errors("read", uri):
                return self.client.get_object(Bucket=uri.bucket, Key=uri.key, **extra)["Body"].read()
        except StorageError as e:
            if isinstance(e.__cause__, ClientError) and _code(e.__cause__) in NOT_FOUND:
                return None
            raise

    def stream(self, uri: S3Uri, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks (bounded memory)."""
        with self._errors("read", uri):
            body = self.client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"]
            yield from body.iter_chunks(chunk)

    def download(self, uri: S3Uri, path: Path) -> None:
        """The object into a local file (parallel ranged reads for a large one)."""
        from boto3.s3.transfer import TransferConfig

        path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("download", uri):
            self.client.download_file(uri.bucket, uri.key, str(path), Config=TransferConfig(
                multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=CONCURRENCY))

    def objects(self, uri: S3Uri, limit: int | None = None) -> dict[str, int]:
        """Every object below `uri` (recursively; the first `limit` of them): key relative to `uri` -> size."""
        found: dict[str, int] = {}
        pages = {"PaginationConfig": {"MaxItems": limit}} if limit else {}
        with self._errors("list", uri):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.prefix,
                                                                                 **pages):
                for item in page.get("Contents", []):
                    found[item["Key"][len(uri.prefix):]] = item["Size"]
        return found

    def children(self, uri: S3Uri) -> list[str]:
        """The names of the 'directories' directly below `uri`."""
        names = []
        with self._errors("list", uri):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=uri.bucket, Prefix=uri.prefix, Delimiter="/"):
                names += [p["Prefix"][len(uri.prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)

    # -- writing ---------------------------------------------------------------------------------
    def put_bytes(self, uri: S3Uri, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write a small object whole; returns its ETag. `if_none_match`: only if it does not exist;
        `if_match`: only if its ETag is still this one (PreconditionFailed otherwise)."""
        extra = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        with self._errors("write", uri):
            return self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, **extra)["ETag"]

    def upload(self, path: Path, uri: S3Uri) -> None:
        """A local file as an object: multipart with parallel parts when large, streamed from the file."""
        from boto3.s3.transfer import TransferConfig

        with self._errors("upload", uri):
            self.client.upload_file(str(path), uri.bucket, uri.key, Config=TransferConfig(
                multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=CONCURRENCY))

    def delete(self, uris: list[S3Uri]) -> None:
        for uri in uris:
            with self._errors("delete", uri):
                self.client.delete_object(Bucket=uri.bucket, Key=uri.key)

    def delete_below(self, uri: S3Uri) -> None:
        """Every object below `uri`, and any unfinished multipart upload there."""
        self.delete([uri / key for key in self.objects(uri)])
        with self._errors("list uploads", uri):
            uploads = self.client.list_multipart_uploads(Bucket=uri.bucket, Prefix=uri.prefix).get("Uploads", [])
        for upload in uploads:
            with self._errors("abort upload", uri):
                self.client.abort_multipart_upload(Bucket=uri.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    # -- checking --------------------------------------------------------------------------------
    def probe(self, uri: S3Uri, write: bool = True) -> bool:
        """Check, before any run starts, that the bucket is reachable, readable and (`write`)
        writable with these credentials: one-line ConfigErrors otherwise. Returns whether the server
        honours conditional writes (If-None-Match)."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"{uri} (S3 endpoint {self.endpoint})"
        try:
            self.client.list_objects_v2(Bucket=uri.bucket, Prefix=uri.prefix, MaxKeys=1)
            if not write:
                return True
            probe = uri / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
            self.client.put_object(Bucket=uri.bucket, Key=probe.key, Body=b"probe", IfNoneMatch="*")
            try:
                self.client.put_object(Bucket=uri.bucket, Key=probe.key, Body=b"probe", IfNoneMatch="*")
                honoured = False
            except ClientError as e:
                if _code(e) not in PRECONDITION_FAILED:
                    raise
                honoured = True
            self.client.delete_object(Bucket=uri.bucket, Key=probe.key)
            return honoured
        except NoCredentialsError:
            raise ConfigError(f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                              f"AWS_PROFILE, or use an instance or pod role)") from None
        except EndpointConnectionError as e:
            raise ConfigError(f"{where}: cannot reach the server ({e})") from None
        except ClientError as e:
            raise ConfigError(f"{where}: {_explain(_code(e))}") from None
        except Exception as e:  # noqa: BLE001 - e.g. a connection reset or a malformed endpoint
            raise ConfigError(f"{where}: cannot reach the server ({type(e).__name__}: {e})") from None


def _explain(code: str) -> str:
    if code in ("NoSuchBucket", "404"):
        return "the bucket does not exist"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
        return f"the server refused the credentials ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if code in ACCESS_DENIED:
        return f"access denied ({code}): these credentials may not read and write this bucket and prefix"
    return f"the server refused the request ({code})"


@functools.lru_cache(maxsize=1)
def store() -> ObjectStore:
    """The process's object store (boto3 is imported on first use, not by every command)."""
    try:
        return ObjectStore()
    except ImportError:
        raise UserError("an s3:// runs root needs boto3: make setup, or pip install -e '.[s3]' in the "
                        "checkout") from None
