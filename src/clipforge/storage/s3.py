"""boto3 clients configured the way AWS CLI users expect.

`AWS_ENDPOINT_URL` (honoured by boto3 itself) points them at any S3 server,
which is how tests reach a loopback server; `unsigned=True` is
`--no-sign-request` for public buckets such as NSD's.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass

import boto3
import boto3.exceptions
import botocore
from botocore.config import Config

from clipforge.errors import StorageUnreachable, first_line

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


def client(unsigned: bool = False, quick: bool = False):
    """A thread-safe client per process (clients must not cross a fork) and endpoint. A `quick` one gives up
    within seconds, for checks where no answer is an answer too (a run's look for its inputs), never for data:
    with an endpoint that drops packets, the default one waits 60 s per attempt, five times."""
    token = (os.getpid(), unsigned, quick, os.environ.get("AWS_ENDPOINT_URL"))
    with _lock:
        if token not in _clients:
            patience = {"connect_timeout": 5, "read_timeout": 10} if quick else {}
            config = Config(
                retries={"max_attempts": 2 if quick else 5, "mode": "standard"},
                max_pool_connections=32,
                signature_version=botocore.UNSIGNED if unsigned else None,
                **patience,
            )
            _clients[token] = boto3.session.Session().client("s3", config=config)
        return _clients[token]


BODY_ATTEMPTS = 5  # of a whole object's GET whose body came cut short or the connection reset mid-way


# A body cut short or a connection dropped mid-way: worth another try. Missing credentials, an endpoint that does
# not answer, a bad bucket name are not: they go up as they are, for the CLI to say in its one line.
TRANSPORT_FAILURES = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError,
                      botocore.exceptions.ConnectionClosedError, botocore.exceptions.ReadTimeoutError, OSError)


def get_whole(uri: str, *, unsigned: bool = False) -> tuple[bytes, dict]:
    """A whole object's bytes and the reply's headers. botocore retries a request whose reply did not come, not a
    body that stopped part-way (a reset, a proxy's timeout): those are retried here, with backoff, and a body
    shorter than its Content-Length is never returned. After the last try: StorageUnreachable, one line."""
    loc = parse_s3(uri)
    problem = ""
    for attempt in range(BODY_ATTEMPTS):
        if attempt:
            time.sleep(min(4.0, 0.25 * 2**attempt) * (0.5 + random.random()))
        try:
            reply = client(unsigned).get_object(Bucket=loc.bucket, Key=loc.key)
            data = reply["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if not is_overloaded(exc):
                raise
            problem = error_code(exc)
            continue
        except TRANSPORT_FAILURES as exc:
            problem = type(exc).__name__
            continue
        if len(data) == reply.get("ContentLength", len(data)):
            return data, reply
        problem = f"a body of {len(data)} of {reply['ContentLength']} bytes"
    raise StorageUnreachable(f"{uri}: {problem}, {BODY_ATTEMPTS} times; the store or the network is failing")


def put_whole(uri: str, body: bytes, **conditions) -> dict:
    """One PUT of a whole object. After botocore's own retries, a store still answering 503 SlowDown or 500 is
    StorageUnreachable (one line, naming the object), not a traceback; what was committed before stays."""
    loc = parse_s3(uri)
    try:
        return client().put_object(Bucket=loc.bucket, Key=loc.key, Body=body, **conditions)
    except botocore.exceptions.ClientError as exc:
        if is_overloaded(exc):
            raise StorageUnreachable(f"{uri}: writing it failed ({error_code(exc)}) after retries; the store is "
                                     "overloaded or failing") from None
        raise


# What boto3's managed upload says of a store that answered 5xx or 429: its error keeps the ClientError as text.
OVERLOADED_WORDS = ("SlowDown", "ServiceUnavailable", "InternalError", "(500)", "(503)")


def upload_whole(path: str, uri: str) -> None:
    """A local file streamed up (in parts when large); a store refusing past botocore's retries is
    StorageUnreachable in one line, as `put_whole` says it."""
    loc = parse_s3(uri)
    try:
        client().upload_file(path, loc.bucket, loc.key)
    except boto3.exceptions.S3UploadFailedError as exc:
        if not any(word in str(exc) for word in OVERLOADED_WORDS):
            raise
        raise StorageUnreachable(f"{uri}: uploading {path} failed ({first_line(exc)})") from None


def status_of(exc: botocore.exceptions.ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def is_overloaded(exc: botocore.exceptions.ClientError) -> bool:
    """A 5xx or 429 (SlowDown): the store's trouble, worth another try, never the user's to fix."""
    status = status_of(exc)
    return status >= 500 or status == 429


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or status_of(exc))


def is_not_found(exc: Exception) -> bool:
    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


# What S3 answers this identity for an object it may not read (a HEAD's 403 has no code but its status).
DENIED_CODES = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled")


def is_denied(exc: Exception) -> bool:
    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    return str(exc.response.get("Error", {}).get("Code", "")) in DENIED_CODES


# S3 answers that are the user's to fix (a bucket name, credentials, an endpoint), not clipforge bugs.
USER_FIXABLE_CODES = {
    "NoSuchBucket": "bucket {bucket} does not exist",
    **dict.fromkeys(DENIED_CODES, "access denied to {target}: check the credentials and the bucket's policy"),
    "InvalidAccessKeyId": "the AWS access key is not known to {endpoint}",
    "SignatureDoesNotMatch": "the AWS secret key does not match the access key",
    "ExpiredToken": "the AWS session token has expired",
    "InvalidBucketName": "{bucket} is not a valid bucket name",
}


def describe_failure(exc: BaseException, anonymous: str = "") -> str | None:
    """One line for an S3 failure the user can fix (a missing bucket, credentials, an unreachable endpoint);
    None for anything else, which stays a bug with its traceback. `anonymous`: how the caller reads a public
    bucket without credentials (`--no-sign-request`), when it can."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"cannot reach the S3 endpoint {exc.kwargs.get('endpoint_url', endpoint)}: is it up, and is " \
               "AWS_ENDPOINT_URL right?"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE" + \
            (f", or read a public bucket with {anonymous}" if anonymous else "")
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        template = USER_FIXABLE_CODES.get(str(error.get("Code", "")))
        if template:
            bucket = error.get("BucketName") or "?"
            target = f"s3://{bucket}" if bucket != "?" else "the bucket"
            return f"S3 {exc.operation_name}: " + template.format(bucket=bucket, target=target, endpoint=endpoint)
    return None
