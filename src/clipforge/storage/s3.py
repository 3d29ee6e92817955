"""boto3 clients configured the way AWS CLI users expect.

`AWS_ENDPOINT_URL` (honoured by boto3 itself) points them at any S3 server,
which is how tests reach a loopback server; `unsigned=True` is
`--no-sign-request` for public buckets such as NSD's.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import boto3
import botocore
from botocore.config import Config

_clients: dict[tuple, object] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3(uri: str) -> S3Location:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return S3Location(bucket, key)


def client(unsigned: bool = False):
    """A thread-safe client per process (clients must not cross a fork) and endpoint."""
    token = (os.getpid(), unsigned, os.environ.get("AWS_ENDPOINT_URL"))
    with _lock:
        if token not in _clients:
            config = Config(
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=32,
                signature_version=botocore.UNSIGNED if unsigned else None,
            )
            _clients[token] = boto3.session.Session().client("s3", config=config)
        return _clients[token]


def is_not_found(exc: Exception) -> bool:
    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")
