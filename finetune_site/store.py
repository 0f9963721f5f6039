"""Where uploads and artifacts live across machines: FT_SHARED_DIR, with an S3-compatible bucket behind it.

Every machine reads and writes these files under its own FT_SHARED_DIR, because torch, peft, vLLM and the
GGUF writer need real files. With FT_STORE unset that folder is the store itself: one machine, or a folder
every machine mounts at the same path. With FT_STORE=s3://bucket/prefix the folder is this machine's cache
of the bucket:

    store().publish(folder)   after writing a file or folder others will read (upload after write)
    store().fetch(folder)     before reading one another machine may have written (download before use)
    store().forget(folder)    when deleting one
    store().has(path)         whether it exists anywhere, for the web's checks

An object's key is its path under FT_SHARED_DIR, so one key names the same file on every machine; paths
outside that folder (the base models in FT_MODELS_DIR, which each machine prepares itself) are left alone.
Transfers stream between disk and the bucket in parts (boto3's managed transfer), so a checkpoint of
several gigabytes never sits in memory. Credentials and the endpoint come from the environment as boto3
reads them (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3, ...).
"""

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core.files.storage import FileSystemStorage
from django.db import models

log = logging.getLogger(__name__)

PART_BYTES = 8 * 1024 * 1024
"""One part of a transfer: what one thread holds in memory at a time."""
THREADS = 4


class StoreError(RuntimeError):
    """The bucket could not be reached or refused a transfer; the message names the object."""


class FolderStore:
    """FT_SHARED_DIR is the store: what one machine wrote, every machine that mounts it sees."""

    remote = False

    def publish(self, path: str | Path) -> None:
        pass

    def fetch(self, path: str | Path) -> Path:
        return Path(path)

    def forget(self, path: str | Path) -> None:
        pass

    def has(self, path: str | Path) -> bool:
        return Path(path).exists()

    def bytes_under(self, path: str | Path) -> int | None:
        """Bytes stored under path, or None: count the local files."""
        return None


class BucketStore:
    """An S3-compatible bucket (AWS, MinIO, Ceph, moto...) behind this machine's FT_SHARED_DIR."""

    remote = True

    def __init__(self, url: str, root: Path, client: Any = None):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"FT_STORE must look like s3://bucket or s3://bucket/prefix, got {url!r}")
        self.url, self.bucket, self.prefix = url, parsed.netloc, parsed.path.strip("/")
        self.root = Path(root).resolve()
        if client is None:
            import boto3  # only a machine that uses a bucket pays for boto3's import

            client = boto3.client("s3")
        self.client = client
        from boto3.s3.transfer import TransferConfig

        self.transfer = TransferConfig(
            multipart_threshold=PART_BYTES,
            multipart_chunksize=PART_BYTES,
            max_concurrency=THREADS,
            io_chunksize=256 * 1024,
        )

    # --- keys

    def key(self, path: str | Path) -> str | None:
        """The object key of a path under FT_SHARED_DIR; None for a path outside it (not in the store)."""
        try:
            relative = Path(os.path.abspath(path)).relative_to(self.root)
        except ValueError:
            try:
                relative = Path(path).resolve().relative_to(self.root)
            except ValueError:
                return None
        parts = [self.prefix, relative.as_posix()] if self.prefix else [relative.as_posix()]
        return "/".join(p for p in parts if p and p != ".")

    def _local(self, key: str) -> Path:
        relative = key[len(self.prefix) + 1 :] if self.prefix else key
        return self.root / relative

    def _objects(self, key: str) -> Iterator[dict]:
        """The object at key itself, and every object under key/ (a folder)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key)
        for page in self._calling("list", key, list, pages):
            for item in page.get("Contents", ()):
                if item["Key"] == key or item["Key"].startswith(key + "/"):
                    yield item

    def _calling(self, verb: str, key: str, call, *args: Any, **kwargs: Any) -> Any:
        """call(*args, **kwargs), its failure told as which store could not do what to which object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"The artifact store {self.url} could not {verb} {key}: {exc}") from exc

    # --- the four operations

    def publish(self, path: str | Path) -> None:
        """Upload a file, or a folder's files (removing objects its copy in the bucket has and it has not)."""
        key, path = self.key(path), Path(path)
        if key is None:
            return
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stored = {item["Key"]: item for item in self._objects(key)}
        wanted = set()
        for file in files:
            file_key = key if file == path else f"{key}/{file.relative_to(path).as_posix()}"
            wanted.add(file_key)
            if file_key in stored and _holds(file, stored[file_key]):
                continue  # published before, unchanged since: a folder published again sends only what changed
            self._calling(
                "upload", file_key, self.client.upload_file, str(file), self.bucket, file_key, Config=self.transfer
            )
            head = self._calling("read", file_key, self.client.head_object, Bucket=self.bucket, Key=file_key)
            _stamp(file, head["LastModified"])  # this copy is the bucket's: no fetch here downloads it again
        if path.is_dir():
            self._delete(key, [stale for stale in stored if stale not in wanted])

    def fetch(self, path: str | Path) -> Path:
        """Download what this machine lacks of a file or folder, or holds in another version; return its path.

        A file is this machine's copy of an object when its size and its modification time are the object's
        (publish and fetch set the time so): a checkpoint written again at the same size by a resumed run is
        fetched again. A path the bucket does not have is left as it is, for the caller's check to find missing.
        """
        key = self.key(path)
        if key is None:
            return Path(path)
        for item in self._objects(key):
            local = self._local(item["Key"])
            if _holds(local, item):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            # A part file of its own: two processes fetching one file never write into each other's.
            partial = local.with_name(f".{local.name}.{os.getpid()}-{threading.get_ident()}.part")
            try:
                download = self.client.download_file
                self._calling(
                    "download", item["Key"], download, self.bucket, item["Key"], str(partial), Config=self.transfer
                )
                _stamp(partial, item["LastModified"])
                os.replace(partial, local)
            finally:
                partial.unlink(missing_ok=True)
        return Path(path)

    def forget(self, path: str | Path) -> None:
        """Delete a file's or folder's objects (the caller removes this machine's copy)."""
        key = self.key(path)
        if key is not None:
            self._delete(key, [item["Key"] for item in self._objects(key)])

    def has(self, path: str | Path) -> bool:
        if Path(path).exists():
            return True
        key = self.key(path)
        return key is not None and next(self._objects(key), None) is not None

    def bytes_under(self, path: str | Path) -> int | None:
        key = self.key(path)
        return None if key is None else sum(item["Size"] for item in self._objects(key))

    def _delete(self, key: str, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects call takes
            batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
            self._calling("delete", key, self.client.delete_objects, Bucket=self.bucket, Delete=batch)


def _holds(local: Path, item: dict) -> bool:
    """Whether the local file is this machine's copy of the listed object: its size, and its time as _stamp set it."""
    try:
        held = local.stat()
    except FileNotFoundError:
        return False
    return held.st_size == item["Size"] and int(held.st_mtime) == int(item["LastModified"].timestamp())


def _stamp(path: Path, modified: datetime) -> None:
    """Give a local copy its object's modification time: the mark that it holds that version."""
    os.utime(path, (time.time(), modified.timestamp()))


_made: dict[tuple[str, str], FolderStore | BucketStore] = {}
_making = threading.Lock()


def store() -> FolderStore | BucketStore:
    """The store FT_STORE names, for this machine's FT_SHARED_DIR (made once per process and setting)."""
    wanted = (settings.FT_STORE, str(settings.FT_SHARED_DIR))
    with _making:
        if wanted not in _made:
            _made[wanted] = BucketStore(wanted[0], Path(wanted[1])) if wanted[0] else FolderStore()
        return _made[wanted]


def discard(*paths: str | Path) -> None:
    """Remove files or folders here and in the store, after their rows are gone: a store that cannot be
    reached leaves its copy behind (logged), never the delete undone."""
    for path in paths:
        if Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)
        try:
            store().forget(path)
        except StoreError:
            log.warning("the store kept its copy of %s", path, exc_info=True)


class SharedStorage(FileSystemStorage):
    """Uploads (MEDIA_ROOT, under FT_SHARED_DIR): saved on this machine and published, fetched before reading."""

    def _save(self, name: str, content: Any) -> str:
        name = super()._save(name, content)
        store().publish(self.path(name))
        return name

    def _open(self, name: str, mode: str = "rb") -> Any:
        store().fetch(self.path(name))
        return super()._open(name, mode)

    def delete(self, name: str) -> None:
        super().delete(name)
        store().forget(self.path(name))

    def exists(self, name: str) -> bool:
        # Another machine's upload of this name counts: a new one must not take its place.
        return super().exists(name) or (store().remote and store().has(self.path(name)))

    def size(self, name: str) -> int:
        if not os.path.exists(self.path(name)):
            counted = store().bytes_under(self.path(name))
            if counted:
                return counted
        return super().size(name)


SHARED_PREFIX = "shared:"


class SharedPathField(models.CharField):
    """A path that may lie under FT_SHARED_DIR, stored as "shared:<path under it>" and read back under this
    machine's FT_SHARED_DIR: with a bucket, each machine's cache folder may be elsewhere. Other paths (and
    rows written before this field) stay as they are."""

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if not value or str(value).startswith(SHARED_PREFIX):
            return value
        root = Path(settings.FT_SHARED_DIR).resolve()
        for candidate in (Path(os.path.abspath(value)), Path(value).resolve()):
            if candidate.is_relative_to(root):
                return SHARED_PREFIX + candidate.relative_to(root).as_posix()
        return value

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        return self.to_python(value)

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(SHARED_PREFIX):
            return str(Path(settings.FT_SHARED_DIR).resolve() / value.removeprefix(SHARED_PREFIX))
        return value


def resave_paths(app_label: str, model_name: str):
    """A migration's step for a field now a SharedPathField: each row's path is saved again, so one written
    before under FT_SHARED_DIR becomes a path every machine reads under its own."""

    def resave(apps: Any, schema_editor: Any) -> None:
        rows = apps.get_model(app_label, model_name).objects.all()
        for pk, path in rows.values_list("pk", "path"):
            rows.filter(pk=pk).update(path=path)

    return resave
