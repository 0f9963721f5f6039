"""Pages that frame the product: login, overview, API keys, 404."""

import pytest
from django.contrib.auth import get_user_model

from finetune_site.models import ApiKey

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(client):
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client.force_login(user)
    return user


def test_login_page_logs_in(client):
    get_user_model().objects.create_user("bob", password="pw-bob-123")
    response = client.post("/accounts/login/", {"username": "bob", "password": "pw-bob-123"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert "Create fine-tuning task" in client.get("/").content.decode()


def test_a_wrong_password_says_so_and_keeps_the_username(client):
    response = client.post("/accounts/login/", {"username": "nobody", "password": "x"})
    assert "did not match" in response.content.decode() and 'value="nobody"' in response.content.decode()


def test_logging_out_says_so(client, alice):
    response = client.post("/accounts/logout/", follow=True)
    assert response.request["PATH_INFO"] == "/accounts/login/" and "You have logged out." in response.content.decode()
    client.force_login(alice)
    client.logout()  # a logout outside the middleware (scripts, the test client) has nowhere to say it: no error


def test_the_overview_offers_getting_started_until_there_is_a_model(client, alice):
    from deployments_app.models import ModelCard

    assert "Getting started" in client.get("/").content.decode()
    ModelCard.objects.create(
        model_id="ft:x:alice::12345678", owner=alice, base_model="x", method="lora", path="/nowhere"
    )
    assert "Getting started" not in client.get("/").content.decode()


def test_an_api_key_is_shown_once_then_only_its_id(client, alice):
    page = client.post("/keys/", {"name": "laptop"}).content.decode()
    key = ApiKey.objects.get(user=alice)
    raw = page.split('data-testid="new-key">')[1].split("<")[0]
    assert key.matches(raw)
    later = client.get("/keys/").content.decode()
    assert raw not in later and key.key_id in later


def test_revoking_a_key_from_the_page(client, alice):
    key, _ = ApiKey.issue(alice)
    client.post(f"/keys/{key.pk}/revoke/")
    key.refresh_from_db()
    assert not key.is_active


def test_unknown_pages_get_a_finished_404(client, alice, settings):
    settings.DEBUG = False
    response = client.get("/jobs/ftjob-nope/")
    assert response.status_code == 404 and "belongs to another user" in response.content.decode()


def test_fine_tune_from_a_fine_tuned_card_trains_on_from_it(client, alice, settings, tiny_model_dir):
    from deployments_app.models import ModelCard

    settings.FT_MODELS_DIR = tiny_model_dir.parent
    card = ModelCard.objects.create(
        model_id="ft:tiny-random-smollm2:alice::abcd1234",
        owner=alice,
        base_model="tiny-random-smollm2",
        path="/nowhere",
    )
    page = client.get(f"/jobs/new/?model={card.model_id}").content.decode()
    assert f'<option value="{card.model_id}" selected>' in page  # DPO after SFT starts here


def test_the_admin_cannot_edit_server_paths_or_a_jobs_status(client):
    from deployments_app.models import ModelCard
    from jobs_app.models import Checkpoint, FineTuningJob

    root = get_user_model().objects.create_superuser("root", password="pw-root-123")
    client.force_login(root)
    job = FineTuningJob.objects.create(owner=root, base_model="b", training_file_ref="file-x", status="running")
    card = ModelCard.objects.create(model_id="ft:b:root:x", owner=root, base_model="b", path="/srv/models/x")
    checkpoint = Checkpoint.objects.create(job=job, step=3, path="/srv/ckpt/3")
    pages = {
        f"/admin/deployments_app/modelcard/{card.pk}/change/": ['name="path"'],
        f"/admin/jobs_app/checkpoint/{checkpoint.pk}/change/": ['name="path"'],
        f"/admin/jobs_app/finetuningjob/{job.pk}/change/": ['name="status"', 'name="worker"'],
    }
    for url, inputs in pages.items():
        page = client.get(url)
        assert page.status_code == 200, url
        for field in inputs:
            assert field not in page.content.decode(), (url, field)


def test_the_admin_password_is_printed_only_when_it_is_made(tmp_path, monkeypatch, settings):
    from finetune_site.management.commands.runstack import Command

    monkeypatch.delenv("FT_ADMIN_PASSWORD", raising=False)
    settings.FT_ADMIN_USER = "boss"
    first = Command()._ensure_admin(tmp_path)
    password = (tmp_path / "admin-password").read_text().strip()
    assert first == f"Admin login: boss / {password}"
    again = Command()._ensure_admin(tmp_path)
    assert password not in again and str(tmp_path / "admin-password") in again


def test_healthz_tells_anyone_the_status_staff_the_details_and_asks_the_workers_once_in_a_while(client, monkeypatch):
    from finetune_site import views

    censuses = []

    def count_workers():  # the broadcast to every worker is the outer edge here
        censuses.append(1)
        return dict.fromkeys(views.QUEUES, 1)

    monkeypatch.setattr(views, "_check_redis", lambda: None)
    monkeypatch.setattr(views, "_count_workers", count_workers)
    monkeypatch.setattr(views, "_worker_counts", None)
    for _ in range(3):
        anyone = client.get("/healthz")
        assert anyone.status_code == 200 and anyone.json() == {"status": "ok", "down": []}
    assert len(censuses) == 1

    client.force_login(get_user_model().objects.create_superuser("root", password="pw-root-123"))
    report = client.get("/healthz").json()
    assert report["database"]["ok"] and report["queues"]["housekeeping"] == {"workers": 1}
