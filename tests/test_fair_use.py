"""One account cannot take the platform for itself: request and token rates, open chat streams and active jobs
are limited per user, answered 429 with Retry-After in the API's error shape; sign-ins are throttled; passwords
must be more than long.

Counted in a real Redis on 127.0.0.1:6379 (skipped without one), as the web processes count them.
"""

import json

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError

from finetune_site import limits
from finetune_site.errors import Busy
from finetune_site.models import ApiKey
from jobs_app import services

from .live import local_redis
from .test_api_auth import auth, make_dataset
from .test_model_square import BASE, alice, folders  # noqa: F401 - the same user, folders and base model

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def counters(settings):
    with local_redis(settings, 12) as client:
        yield client


@pytest.fixture
def bob(db):
    return get_user_model().objects.create_user("bob", email="bob.builder@example.com", password="pw-bob-123456")


def key_of(user) -> dict:
    return auth(ApiKey.issue(user, name="test")[1])


def chat(client, headers, **fields):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    return client.post(
        "/v1/chat/completions", json.dumps({**body, **fields}), content_type="application/json", **headers
    )


async def read(response) -> bytes:
    return b"".join([chunk async for chunk in response.streaming_content])


def refusal(response) -> dict:
    assert response.status_code == 429, response.content
    assert int(response["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    return error


def test_api_requests_past_the_per_minute_limit_are_429_for_that_user_only(client, settings, alice, bob):
    settings.FT_RATE_LIMIT_RPM = 3
    alice_key, bob_key = key_of(alice), key_of(bob)

    answers = [client.get("/v1/models", **alice_key).status_code for _ in range(3)]
    refused = client.get("/api/paas/v4/models", **alice_key)

    assert answers == [200, 200, 200]
    error = refusal(refused)
    assert error["code"] == "rate_limit_exceeded" and "3 requests per minute" in error["message"]
    assert client.get("/v1/models", **bob_key).status_code == 200
    assert refusal(chat(client, alice_key))["code"] == "rate_limit_exceeded"  # the chat route counts too


def test_chat_tokens_past_the_per_minute_limit_refuse_the_next_request(client, settings, alice):
    settings.FT_RATE_LIMIT_TPM = 10
    headers = key_of(alice)

    first = chat(client, headers)
    assert first.status_code == 200, first.content
    assert first.json()["usage"]["total_tokens"] > 10

    error = refusal(chat(client, headers))
    assert "10 tokens per minute" in error["message"]


def test_a_user_with_every_chat_slot_open_is_refused_and_a_finished_request_frees_its_slot(
    client, settings, alice, counters
):
    settings.FT_MAX_CHAT_STREAMS_PER_USER = 2
    headers = key_of(alice)
    limits.admit_chat(alice)
    limits.admit_chat(alice)  # two requests of alice's still streaming

    error = refusal(chat(client, headers))
    assert error["code"] == "too_many_concurrent_requests"

    limits.finish_chat(alice, 0)
    streamed = chat(client, headers, stream=True)
    assert streamed.status_code == 200
    assert b"[DONE]" in async_to_sync(read)(streamed)
    assert chat(client, headers).status_code == 200  # the streamed answer gave its slot back when it ended
    assert int(counters.get(f"ft:streams:{alice.pk}")) == 1


def test_without_redis_the_limits_let_requests_through(client, settings, alice):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    settings.FT_RATE_LIMIT_RPM = 1
    headers = key_of(alice)

    assert [client.get("/v1/models", **headers).status_code for _ in range(3)] == [200, 200, 200]


def test_an_account_may_have_only_so_many_active_jobs(client, settings, alice, monkeypatch):
    settings.FT_MAX_ACTIVE_JOBS_PER_USER = 2
    monkeypatch.setattr("jobs_app.tasks.train_job.delay", lambda pk: None)
    dataset = make_dataset(alice, format="chat", examples=8)
    for _ in range(2):
        services.job_create(owner=alice, model=BASE, training_file=dataset.public_id)

    refused = client.post(
        "/v1/fine_tuning/jobs",
        {"model": BASE, "training_file": dataset.public_id},
        content_type="application/json",
        **key_of(alice),
    )

    error = refusal(refused)
    assert error["code"] == "too_many_active_jobs" and "2 fine-tuning jobs" in error["message"]
    with pytest.raises(Busy):
        services.job_create(owner=alice, model=BASE, training_file=dataset.public_id)


def sign_in(client, username, password, *, url="/accounts/login/", address="10.0.0.1"):
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=address)


def test_sign_ins_are_refused_after_five_failures_from_an_address_even_with_the_right_password(client, bob):
    for _ in range(5):
        assert sign_in(client, "bob", "wrong").status_code == 200  # the form again, not signed in

    locked = sign_in(client, "bob", "pw-bob-123456")

    assert locked.status_code == 200 and "_auth_user_id" not in client.session
    assert "Too many failed sign-ins for bob from your address: try again in 15 minutes." in locked.content.decode()
    admin = sign_in(client, "bob", "pw-bob-123456", url="/admin/login/")
    assert "Too many failed sign-ins for bob" in admin.content.decode()
    assert sign_in(client, "bob", "pw-bob-123456", address="10.0.0.2").status_code == 302  # another address


def test_a_successful_sign_in_starts_the_count_again(client, bob):
    for _ in range(4):
        sign_in(client, "bob", "wrong")
    assert sign_in(client, "bob", "pw-bob-123456").status_code == 302
    client.logout()
    for _ in range(4):
        sign_in(client, "bob", "wrong")

    assert sign_in(client, "bob", "pw-bob-123456").status_code == 302


@pytest.mark.parametrize(
    "password, why",
    [
        ("short1!", "too short"),
        ("password1234", "too common"),
        ("83920174652", "entirely numeric"),
        ("bob.builder@example", "too similar"),
    ],
)
def test_passwords_must_be_long_uncommon_not_numeric_and_unlike_the_username(bob, password, why):
    with pytest.raises(ValidationError) as refused:
        validate_password(password, user=bob)
    assert why in " ".join(refused.value.messages)


def test_each_choice_of_n_takes_a_chat_slot_and_gives_it_back(client, settings, alice, counters):
    settings.FT_MAX_CHAT_STREAMS_PER_USER = 3
    headers = key_of(alice)
    limits.admit_chat(alice)  # one request of alice's still streaming: two slots left

    error = refusal(chat(client, headers, n=3))
    assert error["code"] == "too_many_concurrent_requests"
    assert int(counters.get(f"ft:streams:{alice.pk}")) == 1  # the refused request took nothing

    answered = chat(client, headers, n=2)
    assert answered.status_code == 200 and len(answered.json()["choices"]) == 2
    assert int(counters.get(f"ft:streams:{alice.pk}")) == 1  # both slots given back at the end
