"""Deployments without a worker: create, scale, cancel, the reconciler, the REST API and its isolation."""

import json
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from deployments_app.deployments import services
from deployments_app.deployments.instance import percentile
from deployments_app.models import Deployment, Instance
from finetune_site.api_errors import status_of
from finetune_site.errors import CapacityExceeded, InvalidInput, InvalidState

pytestmark = pytest.mark.django_db
MODEL = "tiny-random-smollm2"


@pytest.fixture(autouse=True)
def models_dir(settings, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent


@pytest.fixture
def started(monkeypatch):
    """Instance ids handed to the serving queue."""
    sent = []
    monkeypatch.setattr("deployments_app.tasks.run_instance.delay", lambda pk: sent.append(pk))
    return sent


@pytest.fixture
def alice():
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def bob():
    return get_user_model().objects.create_user("bob", password="pw-bob-123")


def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def statuses(deployment):
    return sorted(deployment.instance_set.values_list("status", flat=True))


def load(deployment, *running_pks):
    for pk in running_pks:
        Instance.objects.get(pk=pk).claim_running("test-worker")


def test_create_starts_one_task_per_instance(alice, started, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        deployment = services.deployment_create(user=alice, model_id=MODEL, instances=2, max_concurrent_requests=3)
    assert deployment.public_id.startswith("dep-") and deployment.status == "deploying"
    assert sorted(started) == sorted(deployment.instance_set.values_list("pk", flat=True))
    assert statuses(deployment) == ["starting", "starting"]


def test_it_is_running_only_when_every_instance_loaded(alice, started, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        deployment = services.deployment_create(user=alice, model_id=MODEL, instances=2)
    first, second = deployment.instance_set.all()
    assert first.claim_running("w1")
    assert not deployment.mark_running_if_ready()
    assert second.claim_running("w2")
    assert deployment.mark_running_if_ready()
    assert Deployment.objects.get(pk=deployment.pk).status == "running"


def test_create_refuses_unknown_models_and_bad_counts(alice, bob, started):
    with pytest.raises(InvalidInput) as caught:
        services.deployment_create(user=alice, model_id="no-such-model")
    assert caught.value.param == "model" and caught.value.code == "model_not_found"
    with pytest.raises(InvalidInput) as caught:
        services.deployment_create(user=alice, model_id=MODEL, instances=0)
    assert caught.value.param == "instances"
    with pytest.raises(InvalidInput):
        services.deployment_create(user=alice, model_id=MODEL, max_concurrent_requests=0)
    assert not Deployment.objects.exists()


def test_scaling_up_starts_and_scaling_down_stops_newest_first(alice, started, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        deployment = services.deployment_create(user=alice, model_id=MODEL, instances=1)
    load(deployment, *started)
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_scale(deployment=deployment, instances=3)
    assert len(started) == 3 and statuses(deployment) == ["running", "starting", "starting"]
    load(deployment, started[1])
    services.deployment_scale(deployment=deployment, instances=1)
    # The one still loading stops at once; the newer running one finishes its requests first.
    assert Instance.objects.get(pk=started[2]).status == "stopped"
    assert Instance.objects.get(pk=started[1]).status == "stopping"
    assert Instance.objects.get(pk=started[0]).status == "running"


def test_cancel_stops_every_instance_and_cannot_be_scaled(alice, started, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        deployment = services.deployment_create(user=alice, model_id=MODEL, instances=2)
    load(deployment, started[0])
    services.deployment_cancel(deployment=deployment)
    deployment.refresh_from_db()
    assert deployment.status == "cancelled" and deployment.finished_at
    assert statuses(deployment) == ["stopped", "stopping"]
    with pytest.raises(InvalidState):
        services.deployment_scale(deployment=deployment, instances=2)


def test_reconcile_marks_silent_instances_dead_and_replaces_them(
    alice, started, settings, django_capture_on_commit_callbacks
):
    settings.FT_HEARTBEAT_TIMEOUT = 15
    with django_capture_on_commit_callbacks(execute=True):
        deployment = services.deployment_create(user=alice, model_id=MODEL, instances=2)
    load(deployment, *started)
    silent = Instance.objects.get(pk=started[0])
    Instance.objects.filter(pk=silent.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=60))
    with django_capture_on_commit_callbacks(execute=True):
        report = services.reconcile_deployments()
    assert report == {"dead": [silent.public_id], "started": 1}
    assert Instance.objects.get(pk=silent.pk).status == "dead"
    assert statuses(deployment) == ["dead", "running", "starting"]
    assert len(started) == 3
    with django_capture_on_commit_callbacks(execute=True):
        assert services.reconcile_deployments() == {"dead": [], "started": 0}


def test_reconcile_leaves_cancelled_deployments_alone(alice, started, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        deployment = services.deployment_create(user=alice, model_id=MODEL, instances=1)
    services.deployment_cancel(deployment=deployment)
    with django_capture_on_commit_callbacks(execute=True):
        services.reconcile_deployments()
    assert statuses(deployment) == ["stopped"] and len(started) == 1


def test_usage_counts_instance_hours_tokens_and_cost(alice, started, settings):
    settings.FT_INSTANCE_HOUR_PRICE = 2.0
    deployment = services.deployment_create(user=alice, model_id=MODEL, instances=1)
    now = timezone.now()
    Instance.objects.filter(deployment=deployment).update(
        status="stopped",
        started_at=now - timedelta(hours=1, minutes=30),
        stopped_at=now,
        tokens_generated=300,
        busy_seconds=10,
        requests_served=4,
    )
    body = api(alice).get(f"/api/deployments/{deployment.public_id}").json()
    assert body["instance_hours"] == pytest.approx(1.5)
    assert body["estimated_cost"] == pytest.approx(3.0)
    assert body["tokens_generated"] == 300 and body["requests_served"] == 4
    assert body["instance_list"][0]["tokens_per_second"] == pytest.approx(30.0)


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 95) == 95.0 and percentile([7.0], 95) == 7.0


def test_the_rest_api_creates_lists_scales_and_cancels(alice, started):
    client = api(alice)
    created = client.post("/api/deployments", {"model": MODEL, "instances": 2}, format="json")
    assert created.status_code == 200, created.content
    body = created.json()
    assert body["object"] == "deployment" and body["status"] == "deploying" and body["instances"] == 2
    assert len(body["instance_list"]) == 2 and body["instance_list"][0]["status"] == "starting"
    listed = client.get("/api/deployments").json()
    assert (
        listed["object"] == "list" and [d["id"] for d in listed["data"]] == [body["id"]] and listed["has_more"] is False
    )
    scaled = client.patch(f"/api/deployments/{body['id']}", {"instances": 1}, format="json").json()
    assert scaled["instances"] == 1
    cancelled = client.delete(f"/api/deployments/{body['id']}").json()
    assert cancelled["status"] == "cancelled"


def test_the_rest_api_answers_bad_input_in_the_error_shape(alice, started):
    response = api(alice).post("/api/deployments", {"model": "nope", "instances": 1}, format="json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    response = api(alice).post("/api/deployments", {"model": MODEL, "instances": 99}, format="json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "instances"


def test_bob_gets_404_for_alices_deployment(alice, bob, started):
    deployment = services.deployment_create(user=alice, model_id=MODEL)
    client = api(bob)
    for call in (client.get, client.delete):
        response = call(f"/api/deployments/{deployment.public_id}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.patch(f"/api/deployments/{deployment.public_id}", {"instances": 2}, format="json").status_code == 404
    assert client.get("/api/deployments").json()["data"] == []
    assert Deployment.objects.get(pk=deployment.pk).status == "deploying"


def test_the_api_needs_a_login():
    assert APIClient().get("/api/deployments").status_code in (401, 403)


def test_the_openapi_schema_documents_deployments(alice, client):
    client.force_login(alice)
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").content.decode()
    assert "/api/deployments/{deployment_id}" in schema and "DeploymentCreateInput" in schema


def test_the_pages_create_show_scale_and_cancel(client, alice, started, django_capture_on_commit_callbacks):
    client.force_login(alice)
    assert "Create deployment" in client.get(f"/deployments/?model={MODEL}").content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/deployments/", {"model": MODEL, "instances": "2", "max_concurrent_requests": "2"})
    deployment = Deployment.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/deployments/{deployment.public_id}/"
    page = client.get(response["Location"]).content.decode()
    assert page.count('data-testid="instance-row"') == 2 and "Estimated cost" in page and "p95 latency" in page
    partial = client.get(response["Location"], HTTP_HX_REQUEST="true").content.decode()
    assert "<html" not in partial and 'data-testid="instance-row"' in partial
    client.post(f"/deployments/{deployment.public_id}/scale/", {"instances": "1"})
    assert Deployment.objects.get().instances == 1
    client.post(f"/deployments/{deployment.public_id}/cancel/")
    assert Deployment.objects.get().status == "cancelled"
    assert deployment.public_id in client.get("/deployments/").content.decode()


def test_a_refused_scale_goes_back_to_the_deployment_page_with_the_reason(client, alice, started, settings):
    settings.FT_SERVING_SLOTS = 2
    deployment = services.deployment_create(user=alice, model_id=MODEL)
    client.force_login(alice)
    response = client.post(f"/deployments/{deployment.public_id}/scale/", {"instances": "3"}, follow=True)
    assert response.redirect_chain == [(f"/deployments/{deployment.public_id}/", 302)]
    assert "Not enough serving capacity: 1 of 2 instance slots are in use" in response.content.decode()
    assert Deployment.objects.get().instances == 1


def test_the_create_form_names_the_problem(client, alice, started):
    client.force_login(alice)
    response = client.post("/deployments/", {"model": "nope", "instances": "1", "max_concurrent_requests": "1"})
    assert response.status_code == 400 and "does not exist" in response.content.decode()


def test_bob_cannot_open_alices_deployment_page(client, alice, bob, started):
    deployment = services.deployment_create(user=alice, model_id=MODEL)
    client.force_login(bob)
    assert client.get(f"/deployments/{deployment.public_id}/").status_code == 404
    assert client.post(f"/deployments/{deployment.public_id}/cancel/").status_code == 404


def test_instances_beyond_the_serving_slots_are_refused_across_deployments(alice, bob, started, settings):
    settings.FT_SERVING_SLOTS = 4
    first = services.deployment_create(user=alice, model_id=MODEL, instances=3)
    with pytest.raises(CapacityExceeded) as caught:
        services.deployment_create(user=bob, model_id=MODEL, instances=2)
    assert (
        caught.value.param == "instances"
        and caught.value.code == "insufficient_capacity"
        and status_of(caught.value) == 400
    )
    assert caught.value.message.startswith(
        "Not enough serving capacity: 3 of 4 instance slots are in use (FT_SERVING_SLOTS)"
    )
    second = services.deployment_create(user=bob, model_id=MODEL, instances=1)
    with pytest.raises(CapacityExceeded, match="4 of 4 instance slots"):
        services.deployment_scale(deployment=first, instances=4)
    services.deployment_scale(deployment=second, instances=1)  # no more than it has: always allowed
    services.deployment_cancel(deployment=first)
    services.deployment_scale(deployment=second, instances=4)  # the cancelled deployment's slots are free again
    assert Deployment.objects.get(pk=second.pk).instances == 4 and Deployment.objects.count() == 2


def test_the_api_and_the_page_say_when_serving_capacity_is_short(client, alice, started, settings):
    settings.FT_SERVING_SLOTS = 2
    created = api(alice).post("/api/deployments", {"model": MODEL, "instances": 2}, format="json").json()
    response = api(alice).post("/api/deployments", {"model": MODEL, "instances": 1}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "instances" and error["code"] == "insufficient_capacity"
    assert "2 of 2 instance slots are in use (FT_SERVING_SLOTS)" in error["message"]
    assert api(alice).patch(f"/api/deployments/{created['id']}", {"instances": 3}, format="json").status_code == 400
    client.force_login(alice)
    page = client.post("/deployments/", {"model": MODEL, "instances": "1", "max_concurrent_requests": "1"})
    assert page.status_code == 400 and "Not enough serving capacity: 2 of 2 instance slots" in page.content.decode()
    assert Deployment.objects.count() == 1


def test_the_openapi_schema_says_the_list_is_a_page_of_deployments(alice, client):
    client.force_login(alice)
    schema = json.loads(client.get("/api/schema/", HTTP_ACCEPT="application/json").content)
    listed = schema["paths"]["/api/deployments"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    page = schema["components"]["schemas"][listed["$ref"].rsplit("/", 1)[-1]]
    assert page["type"] == "object" and set(page["properties"]) == {"object", "data", "has_more", "first_id", "last_id"}
    assert page["properties"]["data"]["items"]["$ref"].endswith("/DeploymentOutput")


def test_runstack_gives_the_serving_worker_one_thread_per_slot(settings, tmp_path):
    from finetune_site.management.commands.runstack import Command

    settings.FT_SERVING_SLOTS = 6
    config = Command()._write_config(tmp_path, tmp_path).read_text()
    serve = next(line for line in config.splitlines() if "-Q serving" in line)
    assert "--concurrency 6 " in serve


def test_a_refusal_without_a_code_still_answers_code_null(alice, started):
    # OpenAI's SDKs read `code`; a service that names none must not get one made up for it.
    response = api(alice).post("/api/deployments", {"model": MODEL, "instances": 0}, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "instances",
        "code": None,
    }
    assert "instances must be a whole number" in response.json()["error"]["message"]
