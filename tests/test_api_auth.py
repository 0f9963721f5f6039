"""API keys, the error shape and who sees what (no live stack needed)."""

import time

import jwt
import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from datasets_app.models import Dataset
from finetune_site.models import ApiKey

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice():
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def bob():
    return get_user_model().objects.create_user("bob", password="pw-bob-123")


@pytest.fixture
def alice_key(alice):
    return ApiKey.issue(alice, name="test")[1]


def auth(key):
    return {"HTTP_AUTHORIZATION": f"Bearer {key}"}


def make_dataset(owner, **fields):
    dataset = Dataset(
        **{"owner": owner, "filename": "d.jsonl", "bytes": 10, "status": Dataset.PROCESSED, "examples": 10, **fields}
    )
    dataset.file.save("d.jsonl", SimpleUploadedFile("d.jsonl", b"{}\n"), save=True)
    return dataset


def test_it_stores_only_a_hash_of_the_key(alice):
    key, raw = ApiKey.issue(alice)
    assert raw.startswith(key.key_id + ".")
    assert raw not in key.key_hash and key.matches(raw) and not key.matches(raw + "x")


def test_it_accepts_bearer_bare_and_jwt_forms(client, alice, alice_key):
    assert client.get("/v1/models", **auth(alice_key)).status_code == 200
    assert client.get("/v1/models", HTTP_AUTHORIZATION=alice_key).status_code == 200
    key_id, secret = alice_key.split(".")
    now_ms = int(time.time() * 1000)
    token = jwt.encode(
        {"api_key": key_id, "exp": now_ms + 60_000, "timestamp": now_ms},
        secret,
        algorithm="HS256",
        headers={"alg": "HS256", "sign_type": "SIGN"},
    )
    assert client.get("/v1/models", **auth(token)).status_code == 200


def test_it_rejects_an_expired_or_forged_jwt(client, alice_key):
    key_id, secret = alice_key.split(".")
    past = int(time.time() * 1000) - 1000
    expired = jwt.encode({"api_key": key_id, "exp": past, "timestamp": past}, secret, algorithm="HS256")
    forged = jwt.encode({"api_key": key_id, "exp": past + 10**7, "timestamp": past}, "wrong-secret", algorithm="HS256")
    assert client.get("/v1/models", **auth(expired)).status_code == 401
    assert client.get("/v1/models", **auth(forged)).status_code == 401


def test_a_jwt_must_expire_and_within_a_day(client, alice_key):
    key_id, secret = alice_key.split(".")
    now_ms = int(time.time() * 1000)
    forever = jwt.encode({"api_key": key_id, "timestamp": now_ms}, secret, algorithm="HS256")
    next_year = jwt.encode({"api_key": key_id, "exp": now_ms + 365 * 86_400_000}, secret, algorithm="HS256")
    in_an_hour = jwt.encode({"api_key": key_id, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
    for token, why in ((forever, "no expiry"), (next_year, "too far ahead")):
        response = client.get("/v1/models", **auth(token))
        assert response.status_code == 401 and why in response.json()["error"]["message"]
    assert client.get("/v1/models", **auth(in_an_hour)).status_code == 200


def test_last_used_is_written_at_most_once_a_minute(client, alice, alice_key):
    from datetime import timedelta

    from django.utils import timezone

    assert client.get("/v1/models", **auth(alice_key)).status_code == 200
    first = ApiKey.objects.get(user=alice).last_used_at
    assert first is not None
    client.get("/v1/models", **auth(alice_key))
    assert ApiKey.objects.get(user=alice).last_used_at == first  # the second call wrote nothing
    ApiKey.objects.filter(user=alice).update(last_used_at=timezone.now() - timedelta(minutes=2))
    client.get("/v1/models", **auth(alice_key))
    assert ApiKey.objects.get(user=alice).last_used_at > first


def test_two_instances_on_one_host_keep_their_own_cookies():
    import os
    import subprocess
    import sys

    def cookie_names(port: str) -> str:
        code = (
            "import django.conf, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'finetune_site.settings'; "
            "from django.conf import settings; print(settings.SESSION_COOKIE_NAME, settings.CSRF_COOKIE_NAME)"
        )
        env = {**os.environ, "FT_PORT": port}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout

    first, second = cookie_names("8000"), cookie_names("8001")
    assert first.split() != second.split() and set(first.split()).isdisjoint(second.split())


def test_it_answers_401_with_the_error_shape_and_www_authenticate(client):
    response = client.get("/v1/files")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_revoked_key_stops_working(client, alice):
    key, raw = ApiKey.issue(alice)
    key.revoke()
    assert client.get("/v1/models", **auth(raw)).status_code == 401


def test_create_api_key_prints_the_key_last(capsys):
    call_command("create_api_key", "charlie", "--create-user")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    user = get_user_model().objects.get(username="charlie")
    assert not user.has_usable_password()
    assert ApiKey.objects.get(user=user).matches(last)


def test_create_api_key_refuses_a_missing_user_without_the_flag():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("create_api_key", "nobody")


def test_bob_gets_404_for_alices_file(client, alice, bob):
    dataset = make_dataset(alice)
    _, bob_key = ApiKey.issue(bob)
    assert client.get(f"/v1/files/{dataset.public_id}", **auth(bob_key)).status_code == 404
    assert client.get(f"/v1/files/{dataset.public_id}/content", **auth(bob_key)).status_code == 404
    assert client.get("/v1/files", **auth(bob_key)).json()["data"] == []


def test_file_list_paginates_with_exact_has_more(client, alice, alice_key):
    ids = [make_dataset(alice).public_id for _ in range(5)]
    page = client.get("/v1/files?limit=2", **auth(alice_key)).json()
    assert page["has_more"] is True and [d["id"] for d in page["data"]] == ids[::-1][:2]
    rest = client.get(f"/v1/files?limit=10&after={page['last_id']}", **auth(alice_key)).json()
    assert rest["has_more"] is False and [d["id"] for d in rest["data"]] == ids[::-1][2:]


def test_content_is_served_for_accept_application_binary(client, alice, alice_key):
    dataset = make_dataset(alice)
    response = client.get(f"/v1/files/{dataset.public_id}/content", HTTP_ACCEPT="application/binary", **auth(alice_key))
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"{}\n"


def test_job_create_rejects_an_unknown_model_with_param(client, alice, alice_key):
    dataset = make_dataset(alice)
    response = client.post(
        "/v1/fine_tuning/jobs",
        {"model": "nope", "training_file": dataset.public_id},
        content_type="application/json",
        **auth(alice_key),
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_job_create_on_a_file_still_validating_waits_for_it(client, alice, alice_key, settings, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    dataset = make_dataset(alice)
    Dataset.objects.filter(pk=dataset.pk).update(status=Dataset.UPLOADED)
    response = client.post(
        "/v1/fine_tuning/jobs",
        {"model": "tiny-random-smollm2", "training_file": dataset.public_id},
        content_type="application/json",
        **auth(alice_key),
    )
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "validating_files"  # tests/test_jobs_on_validating_files.py goes on


def test_job_create_rejects_bad_hyperparameters(client, alice, alice_key, settings, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    dataset = make_dataset(alice)
    body = {"model": "tiny-random-smollm2", "training_file": dataset.public_id, "hyperparameters": {"n_epochs": 0}}
    response = client.post("/v1/fine_tuning/jobs", body, content_type="application/json", **auth(alice_key))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "hyperparameters.n_epochs"


def test_job_create_accepts_method_only_and_returns_both_shapes(
    client, alice, alice_key, settings, tiny_model_dir, django_capture_on_commit_callbacks
):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    dataset = make_dataset(alice)
    body = {
        "model": "tiny-random-smollm2",
        "training_file": dataset.public_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto"}}},
    }
    response = client.post("/v1/fine_tuning/jobs", body, content_type="application/json", **auth(alice_key))
    job = response.json()
    assert response.status_code == 200, job
    assert job["hyperparameters"]["n_epochs"] == 2
    assert isinstance(job["hyperparameters"]["batch_size"], int)
    assert job["method"]["supervised"]["hyperparameters"] == job["hyperparameters"]
    assert job["object"] == "fine_tuning.job" and isinstance(job["created_at"], int)


def test_chat_rejects_an_unknown_model_with_404(client, alice_key):
    response = client.post(
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
        **auth(alice_key),
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_chat_rejects_malformed_json_with_400(client, alice_key):
    response = client.post("/v1/chat/completions", "{not json", content_type="application/json", **auth(alice_key))
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_the_zhipu_path_serves_the_same_api(client, alice_key):
    assert client.get("/api/paas/v4/models", **auth(alice_key)).status_code == 200


def test_pages_need_login(client):
    for url in ("/", "/datasets/", "/jobs/", "/jobs/new/", "/models/", "/playground/", "/keys/"):
        response = client.get(url)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"], url


def test_the_api_docs_and_schema_need_a_login_or_a_key(client, alice_key):
    docs = client.get("/api/docs/")
    assert docs.status_code == 302 and docs["Location"].startswith("/accounts/login/")
    assert client.get("/api/schema/").status_code == 401
    assert client.get("/api/schema/", **auth(alice_key)).status_code == 200


def test_the_openapi_schema_documents_the_api(client, alice):
    client.force_login(alice)
    schema = client.get("/api/schema/").content.decode()
    assert "/v1/fine_tuning/jobs" in schema and "/v1/files" in schema and "bearer" in schema
    docs = client.get("/api/docs/").content.decode()
    assert "cdn." not in docs and "/static/drf_spectacular_sidecar/" in docs
