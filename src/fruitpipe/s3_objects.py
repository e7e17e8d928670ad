"""S3 object calls pyarrow's filesystem cannot make, through one boto3 client per process and endpoint: a whole
object in one GET with its ETag (no HEAD first), and conditional PUTs (If-Match, If-None-Match)."""

from __future__ import annotations

import threading
from typing import Any

from fruitpipe.storage_options import StorageOptions, current

_CLIENTS: dict[tuple[str | None, str], Any] = {}
_LOCK = threading.Lock()


def client(opts: StorageOptions | None = None) -> Any:
    """One boto3 S3 client per process and endpoint (clients are thread-safe; sessions are not)."""
    opts = opts or current()
    key = (opts.s3_endpoint, opts.region)
    with _LOCK:
        found = _CLIENTS.get(key)
        if found is None:
            import boto3
            from botocore.config import Config

            # Standard retry mode: throttling (503 SlowDown) and connection resets are retried with backoff.
            found = boto3.session.Session().client(
                "s3", region_name=opts.region, endpoint_url=opts.s3_endpoint,
                config=Config(retries={"max_attempts": 8, "mode": "standard"}, max_pool_connections=32))
            _CLIENTS[key] = found
        return found


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def get(uri: str, opts: StorageOptions | None = None) -> tuple[bytes, str]:
    """(bytes, ETag) of the object at the s3:// `uri`, in one GET. Missing: FileNotFoundError; refused:
    PermissionError; anything else: OSError (a caller's task is then retried)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(uri)
    try:
        obj = client(opts).get_object(Bucket=bucket, Key=key)
        return obj["Body"].read(), str(obj["ETag"])
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            raise FileNotFoundError(f"{uri}: {code}") from None
        if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidObjectState"):
            raise PermissionError(f"{uri}: {code}") from None
        raise OSError(f"{uri}: S3 {code}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"{uri}: {exc}") from None


def put_if(uri: str, data: bytes, etag: str | None, opts: StorageOptions | None = None) -> str | None:
    """PUT `data` at the s3:// `uri` only if the object is the version `etag` names (None: only if there is none);
    the new ETag, or None when another writer changed it first."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(uri)
    cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        return str(client(opts).put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"])
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return None
        raise OSError(f"{uri}: S3 {code}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"{uri}: {exc}") from None
