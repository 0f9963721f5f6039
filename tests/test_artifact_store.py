"""The artifact store against a real S3-compatible server (moto's server mode on a local port).

Each "machine" here is its own FT_SHARED_DIR, the local cache of one shared bucket: what one publishes,
another fetches; the paths saved in the database mean the same files on both.
"""

import hashlib
import os
import threading
import time
import tracemalloc

import boto3
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from finetune_site.env import env_bucket
from finetune_site.store import BucketStore, SharedPathField, StoreError, discard, store

from .live import free_port, s3_server

BUCKET = "ft-artifacts"


@pytest.fixture(scope="module")
def s3_env():
    with s3_server() as env:
        yield env


@pytest.fixture
def bucket(s3_env, monkeypatch):
    """A fresh bucket, and the process's environment set as a machine's would be (boto3 reads it)."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    name = f"{BUCKET}-{os.urandom(4).hex()}"
    s3.create_bucket(Bucket=name)
    return name


def machine(bucket: str, root) -> BucketStore:
    root.mkdir(parents=True, exist_ok=True)
    return BucketStore(f"s3://{bucket}/console", root)


def write(path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_a_folder_published_on_one_machine_is_fetched_whole_on_another(bucket, tmp_path):
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    folder = "artifacts/jobs/ftjob-1/checkpoints/step-4"
    write(tmp_path / "a" / folder / "adapter_model.safetensors", b"weights" * 1000)
    write(tmp_path / "a" / folder / "optimizer" / "state.pt", b"moments")

    a.publish(tmp_path / "a" / folder)
    assert not (tmp_path / "b" / folder).exists() and b.has(tmp_path / "b" / folder)
    assert b.bytes_under(tmp_path / "b" / folder) == 7000 + 7
    assert b.fetch(tmp_path / "b" / folder) == tmp_path / "b" / folder

    assert (tmp_path / "b" / folder / "adapter_model.safetensors").read_bytes() == b"weights" * 1000
    assert (tmp_path / "b" / folder / "optimizer" / "state.pt").read_bytes() == b"moments"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == [f"console/{folder}/adapter_model.safetensors", f"console/{folder}/optimizer/state.pt"]
    assert not list((tmp_path / "b").rglob("*.part")), "a finished download leaves no part file"


def test_fetch_downloads_only_what_this_machine_lacks_or_holds_in_another_version(bucket, tmp_path, monkeypatch):
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    write(tmp_path / "a" / "artifacts" / "ckpt" / "one.bin", b"1111")
    write(tmp_path / "a" / "artifacts" / "ckpt" / "two.bin", b"2222")
    a.publish(tmp_path / "a" / "artifacts" / "ckpt")
    downloads = []
    download = b.client.download_file
    monkeypatch.setattr(
        b.client, "download_file", lambda *args, **kw: downloads.append(args[1]) or download(*args, **kw)
    )

    b.fetch(tmp_path / "b" / "artifacts" / "ckpt")
    assert sorted(downloads) == ["console/artifacts/ckpt/one.bin", "console/artifacts/ckpt/two.bin"]
    b.fetch(tmp_path / "b" / "artifacts" / "ckpt")
    a.fetch(tmp_path / "a" / "artifacts" / "ckpt")  # the publisher's own files are the bucket's copies too
    assert len(downloads) == 2

    # A resumed run writes the file again at the same size (a checkpoint's weights): B takes the new one.
    time.sleep(1.1)  # the bucket's times are whole seconds
    write(tmp_path / "a" / "artifacts" / "ckpt" / "one.bin", b"ONE!")
    a.publish(tmp_path / "a" / "artifacts" / "ckpt")
    b.fetch(tmp_path / "b" / "artifacts" / "ckpt")
    assert downloads[2:] == ["console/artifacts/ckpt/one.bin"]
    assert (tmp_path / "b" / "artifacts" / "ckpt" / "one.bin").read_bytes() == b"ONE!"


def test_publishing_a_folder_again_drops_the_files_it_no_longer_has(bucket, tmp_path):
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    folder = tmp_path / "a" / "artifacts" / "jobs" / "ftjob-2" / "adapter"
    write(folder / "old.bin", b"old")
    a.publish(folder)
    (folder / "old.bin").unlink()
    write(folder / "new.bin", b"new")
    a.publish(folder)

    b.fetch(tmp_path / "b" / "artifacts" / "jobs" / "ftjob-2" / "adapter")
    assert sorted(p.name for p in (tmp_path / "b" / "artifacts" / "jobs" / "ftjob-2" / "adapter").iterdir()) == [
        "new.bin"
    ]


def test_forget_removes_a_folder_from_the_bucket_and_other_paths_are_left_alone(bucket, tmp_path):
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    write(tmp_path / "a" / "artifacts" / "x" / "f", b"x")
    write(tmp_path / "a" / "artifacts" / "xy" / "f", b"xy")  # a key that only starts like the forgotten one
    a.publish(tmp_path / "a" / "artifacts" / "x")
    a.publish(tmp_path / "a" / "artifacts" / "xy")

    b.forget(tmp_path / "b" / "artifacts" / "x")

    assert not b.has(tmp_path / "b" / "artifacts" / "x") and b.has(tmp_path / "b" / "artifacts" / "xy")
    outside = tmp_path / "models" / "base"  # each machine's own base models: never in the bucket
    write(outside / "config.json", b"{}")
    a.publish(outside)
    assert a.key(outside) is None and a.fetch(outside) == outside and a.bytes_under(outside) is None
    assert [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]] == [
        "console/artifacts/xy/f"
    ]


def test_a_big_file_streams_through_in_parts_and_never_sits_in_memory(bucket, tmp_path):
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    big = tmp_path / "a" / "artifacts" / "model" / "model.safetensors"
    big.parent.mkdir(parents=True)
    size = 160 * 1024 * 1024
    with big.open("wb") as out:
        for block in range(size // (1024 * 1024)):
            out.write(hashlib.sha256(str(block).encode()).digest() * (1024 * 1024 // 32))

    tracemalloc.start()
    try:
        a.publish(big.parent)
        _, uploading = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        b.fetch(tmp_path / "b" / "artifacts" / "model")
        _, downloading = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    copy = tmp_path / "b" / "artifacts" / "model" / "model.safetensors"
    assert copy.stat().st_size == size
    assert _digest(copy) == _digest(big)
    # The parts in flight (8 MiB, 4 threads), not the file's 160 MiB.
    assert uploading < 64 * 1024 * 1024, f"publishing held {uploading / 2**20:.0f} MiB at its peak"
    assert downloading < 64 * 1024 * 1024, f"fetching held {downloading / 2**20:.0f} MiB at its peak"


def _digest(path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def test_a_fetch_racing_another_never_leaves_a_torn_file(bucket, tmp_path):
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    write(tmp_path / "a" / "artifacts" / "r" / "weights", os.urandom(3 * 1024 * 1024))
    a.publish(tmp_path / "a" / "artifacts" / "r")
    threads = [threading.Thread(target=b.fetch, args=(tmp_path / "b" / "artifacts" / "r",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (tmp_path / "b" / "artifacts" / "r" / "weights").read_bytes() == (
        tmp_path / "a" / "artifacts" / "r" / "weights"
    ).read_bytes()


def test_an_unreachable_store_says_which_store_and_which_object(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    away = BucketStore("s3://nowhere/ft", tmp_path)
    write(tmp_path / "artifacts" / "a" / "f", b"x")
    with pytest.raises(StoreError, match=r"s3://nowhere/ft could not list ft/artifacts/a"):
        away.publish(tmp_path / "artifacts" / "a")
    with pytest.raises(StoreError, match=r"could not list ft/artifacts/b"):
        away.fetch(tmp_path / "artifacts" / "b")


def test_a_store_address_that_is_not_s3_stops_the_start_saying_what_it_should_look_like(monkeypatch, tmp_path):
    for wrong in ("https://bucket.example.com", "s3://", "bucket"):
        monkeypatch.setenv("FT_STORE", wrong)
        with pytest.raises(ImproperlyConfigured, match=r"FT_STORE must look like s3://bucket or s3://bucket/prefix"):
            env_bucket("FT_STORE")
    monkeypatch.setenv("FT_STORE", "s3://ft-artifacts/console")
    assert env_bucket("FT_STORE") == "s3://ft-artifacts/console"
    with pytest.raises(ValueError, match=r"FT_STORE must look like s3://bucket"):
        BucketStore("https://bucket.example.com", tmp_path)


# --- Through Django: uploads (the default storage) and the paths rows keep


@pytest.fixture
def on_machine(settings, bucket, tmp_path):
    """Switch this process to one machine: its FT_SHARED_DIR (cache) under tmp_path, the bucket shared."""

    def switch(name: str):
        settings.FT_STORE = f"s3://{bucket}/console"
        settings.FT_SHARED_DIR = tmp_path / name
        settings.MEDIA_ROOT = tmp_path / name / "media"
        default_storage.__dict__.pop("_wrapped", None)
        default_storage._setup()
        return store()

    yield switch
    default_storage._setup()


def test_an_upload_saved_on_one_machine_opens_on_another(on_machine, tmp_path):
    on_machine("web")
    name = default_storage.save("datasets/2026/12/train.jsonl", ContentFile(b'{"messages": []}\n'))

    on_machine("worker")
    assert not (tmp_path / "worker" / "media" / name).exists()
    assert default_storage.exists(name) and default_storage.size(name) == 17
    with default_storage.open(name) as upload:
        assert upload.read() == b'{"messages": []}\n'
    # Another machine's file of that name is taken: a new upload gets a name of its own.
    (tmp_path / "worker" / "media" / name).unlink()
    assert default_storage.save(name, ContentFile(b"other")) != name

    default_storage.delete(name)
    on_machine("web")
    (tmp_path / "web" / "media" / name).unlink()
    assert not default_storage.exists(name)


def test_a_saved_path_under_the_shared_folder_reads_back_under_each_machines_own(settings, tmp_path):
    field = SharedPathField(max_length=500)
    settings.FT_SHARED_DIR = tmp_path / "b"
    (tmp_path / "b").mkdir()
    stored = field.get_prep_value(str(tmp_path / "b" / "artifacts" / "jobs" / "ftjob-1" / "adapter"))
    assert stored == "shared:artifacts/jobs/ftjob-1/adapter"

    settings.FT_SHARED_DIR = tmp_path / "a"
    (tmp_path / "a").mkdir()
    assert field.from_db_value(stored, None, None) == str(
        (tmp_path / "a").resolve() / "artifacts" / "jobs" / "ftjob-1" / "adapter"
    )
    # A path elsewhere, and rows written before this field, keep their absolute path.
    assert field.get_prep_value("/srv/models/base") == "/srv/models/base"
    assert field.from_db_value("/srv/old/adapter", None, None) == "/srv/old/adapter"


def test_discard_removes_the_local_copy_and_the_buckets(on_machine, tmp_path):
    shared = on_machine("worker")
    folder = tmp_path / "worker" / "artifacts" / "exports" / "7"
    write(folder / "merged" / "config.json", b"{}")
    shared.publish(folder)
    discard(folder)
    assert not folder.exists() and not shared.has(folder)


@pytest.mark.django_db
def test_rows_written_before_the_migration_get_paths_every_machine_reads(settings, tmp_path, django_user_model):
    from django.apps import apps
    from django.db import connection

    from finetune_site.store import resave_paths
    from jobs_app.models import Checkpoint, FineTuningJob

    settings.FT_SHARED_DIR = tmp_path
    owner = django_user_model.objects.create_user("old")
    job = FineTuningJob.objects.create(owner=owner, base_model="m", training_file_id=None)
    old = str(tmp_path.resolve() / "artifacts" / "jobs" / job.public_id / "checkpoints" / "step-3")
    checkpoint = Checkpoint.objects.create(job=job, step=3, path="placeholder")
    with connection.cursor() as cursor:  # as the column held it before: an absolute path
        cursor.execute("UPDATE jobs_app_checkpoint SET path = %s WHERE id = %s", [old, checkpoint.pk])

    resave_paths("jobs_app", "checkpoint")(apps, None)

    with connection.cursor() as cursor:
        cursor.execute("SELECT path FROM jobs_app_checkpoint WHERE id = %s", [checkpoint.pk])
        assert cursor.fetchone()[0] == f"shared:artifacts/jobs/{job.public_id}/checkpoints/step-3"
    checkpoint.refresh_from_db()
    assert checkpoint.path == old
