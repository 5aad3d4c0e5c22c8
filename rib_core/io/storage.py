"""Where bytes live: a local directory or an S3 bucket (any endpoint), behind one interface.

Weights, manifests and images are named by a local path or an ``s3://bucket/key`` URI. The S3
client honours the usual AWS variables, ``AWS_ENDPOINT_URL`` included, so the same code talks to
AWS, MinIO or moto. Nothing here downloads from the internet on its own.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

S3_SCHEME = "s3://"


def is_s3_uri(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def s3_client(endpoint_url: str | None = None, **kwargs: Any) -> Any:
    """A boto3 S3 client; ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) selects a non-AWS server."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                    retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config, **kwargs)


def join_uri(base: str, relative: str) -> str:
    """Resolve ``relative`` against the folder ``base`` (a local folder or an s3:// prefix)."""
    if is_s3_uri(relative) or os.path.isabs(relative):
        return relative
    if is_s3_uri(base):
        return base.rstrip("/") + "/" + relative
    return str(Path(base) / relative)


def parent_uri(uri: str) -> str:
    if is_s3_uri(uri):
        return uri.rsplit("/", 1)[0]
    return str(Path(uri).resolve().parent)


def read_bytes(uri: str | os.PathLike[str], client: Any = None) -> bytes:
    """Bytes at a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        client = client or s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey as e:
            raise FileNotFoundError(f"no object at {uri}") from e
    return Path(uri).read_bytes()


class ObjectReader:
    """Reads many objects by URI with one S3 client (a client per read costs more than a small GET),
    optionally through a local folder that keeps every s3:// object once fetched, so a worker reads
    each object of a data set from S3 once per folder. Objects are taken as immutable (data sets are
    frozen): a changed object under the same URI is not noticed. ``remote_reads`` counts the GETs."""

    def __init__(self, disk_cache: str | os.PathLike[str] | None = None, client: Any = None) -> None:
        self.disk_cache = Path(disk_cache) if disk_cache else None
        if self.disk_cache is not None:
            self.disk_cache.mkdir(parents=True, exist_ok=True)
        self._client = client
        self._lock = threading.Lock()
        self.remote_reads = 0

    def read(self, uri: str) -> bytes:
        """Bytes at a local path or an s3:// URI (from the disk cache when it holds them)."""
        if not is_s3_uri(uri):
            return read_bytes(uri)
        cached = self.disk_cache / hashlib.sha256(uri.encode()).hexdigest() if self.disk_cache else None
        if cached is not None and cached.exists():
            return cached.read_bytes()
        with self._lock:
            self._client = self._client or s3_client()
            self.remote_reads += 1
        data = read_bytes(uri, self._client)
        if cached is not None:
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, cached)  # atomic: a reader in another process never sees half an object
        return data


def _s3_head(uri: str, client: Any = None) -> dict[str, Any]:
    """An S3 object's metadata (HEAD, no bytes); FileNotFoundError when absent."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    try:
        return (client or s3_client()).head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"no object at {uri}") from e
        raise


def uri_size(uri: str, client: Any = None) -> int:
    """Bytes at a local path or an s3:// URI, without reading them; FileNotFoundError when absent."""
    if is_s3_uri(uri):
        return int(_s3_head(uri, client)["ContentLength"])
    return Path(uri).stat().st_size


def uri_version(uri: str, client: Any = None) -> str:
    """What changes when the object at a path or an s3:// URI is rewritten (S3's ETag; a file's size
    and modification time), read without its bytes; FileNotFoundError when absent."""
    if is_s3_uri(uri):
        return str(_s3_head(uri, client)["ETag"])
    stat = Path(uri).stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def uri_exists(uri: str, client: Any = None) -> bool:
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        client = client or s3_client()
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception:
            return False
    return Path(uri).exists()


def bucket_exists(bucket: str, client: Any = None) -> bool:
    """Whether the bucket is there (and ours to read); connection failures raise."""
    from botocore.exceptions import ClientError

    client = client or s3_client()
    try:
        client.head_bucket(Bucket=bucket)
        return True
    except ClientError:
        return False


class Storage(ABC):
    """Keyed blob store for results. Keys are relative, '/'-separated and never leave the root."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def uri(self, key: str) -> str:
        """A URI (``s3://`` or a path) that ``read_bytes`` accepts."""

    def url(self, key: str, expires_s: int = 3600) -> str:
        """A link a person can open: presigned on S3, ``file://`` locally."""
        return self.uri(key)

    @staticmethod
    def check_key(key: str) -> str:
        norm = posixpath.normpath(key)
        if key.startswith("/") or norm.startswith("..") or "\\" in key or norm in ("", "."):
            raise ValueError(f"invalid storage key {key!r}: keys are relative and stay inside the root")
        return norm


class LocalStorage(Storage):
    """Results in a directory: the embedded default, no server needed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / self.check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: readers never see half a file

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        search = base if base.is_dir() else base.parent
        if not search.exists():
            return
        for p in sorted(search.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and rel.startswith(prefix) and not p.name.startswith("."):
                yield rel

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def url(self, key: str, expires_s: int = 3600) -> str:
        return self._path(key).as_uri()


class S3Storage(Storage):
    """Results under ``s3://bucket/prefix`` on any S3-compatible endpoint."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None,
                 public_client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or s3_client()
        # Presigned URLs must name the host users reach, which can differ from the internal one.
        self.public_client = public_client or self.client

    def _key(self, key: str) -> str:
        key = self.check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self.client.exceptions.ClientError:
            return False

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"  # a folder: check_key's normalising drops the '/', and "d00" would match "d000"
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def url(self, key: str, expires_s: int = 3600) -> str:
        return self.public_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s)


def open_storage(uri: str, client: Any = None, public_client: Any = None) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage; anything else is a local directory."""
    if is_s3_uri(uri):
        bucket, prefix = split_s3_uri(uri)
        return S3Storage(bucket, prefix, client=client, public_client=public_client)
    return LocalStorage(uri)
