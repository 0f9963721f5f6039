"""Deployment slots per user: one account's deployments may hold FT_MAX_DEPLOYMENT_SLOTS_PER_USER instances in all.

Creating or scaling past it is refused with 429 in the API's error shape, and beside the form on
the pages; another account's instances never count, and a cancelled deployment gives its slots back.
"""

import pytest

from deployments_app.deployments import services
from deployments_app.models import Deployment
from finetune_site.api_errors import status_of
from finetune_site.errors import Busy

from .test_deployments import alice, api, bob  # noqa: F401 - the same users and API client

pytestmark = pytest.mark.django_db
MODEL = "tiny-random-smollm2"


@pytest.fixture(autouse=True)
def slots(settings, tiny_model_dir, monkeypatch):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.FT_SERVING_SLOTS = 32  # the server has room: only the per-user limit can refuse
    settings.FT_MAX_DEPLOYMENT_SLOTS_PER_USER = 3
    monkeypatch.setattr("deployments_app.tasks.run_instance.delay", lambda pk: None)


def test_it_refuses_a_deployment_past_the_users_slots(alice):
    services.deployment_create(user=alice, model_id=MODEL, instances=2)

    with pytest.raises(Busy) as refused:
        services.deployment_create(user=alice, model_id=MODEL, instances=2)

    error = refused.value
    assert status_of(error) == 429 and error.code == "too_many_deployment_instances" and error.param == "instances"
    assert error.message.startswith(
        "Too many serving instances: your deployments hold 2 of the 3 one account may have "
        "(FT_MAX_DEPLOYMENT_SLOTS_PER_USER), and this needs 2 more."
    )
    services.deployment_create(user=alice, model_id=MODEL, instances=1)  # exactly the limit fits
    assert Deployment.objects.filter(owner=alice).count() == 2


def test_it_refuses_scaling_past_the_users_slots_but_always_allows_scaling_down(alice):
    first = services.deployment_create(user=alice, model_id=MODEL, instances=1)
    second = services.deployment_create(user=alice, model_id=MODEL, instances=2)

    with pytest.raises(Busy, match="hold 3 of the 3 one account may have .* needs 1 more"):
        services.deployment_scale(deployment=first, instances=2)

    services.deployment_scale(deployment=second, instances=1)
    services.deployment_scale(deployment=first, instances=2)  # the slot second gave back
    assert Deployment.objects.get(pk=first.pk).instances == 2


def test_another_users_instances_do_not_count_and_a_cancelled_deployment_frees_its_slots(alice, bob):
    bobs = services.deployment_create(user=bob, model_id=MODEL, instances=3)
    alices = services.deployment_create(user=alice, model_id=MODEL, instances=3)  # bob's 3 are not hers

    services.deployment_cancel(deployment=bobs)
    services.deployment_create(user=bob, model_id=MODEL, instances=3)

    assert Deployment.objects.get(pk=alices.pk).instances == 3
    assert Deployment.objects.filter(owner=bob, status=Deployment.CANCELLED).count() == 1


def test_zero_means_no_per_user_limit(alice, settings):
    settings.FT_MAX_DEPLOYMENT_SLOTS_PER_USER = 0

    deployment = services.deployment_create(user=alice, model_id=MODEL, instances=5)
    services.deployment_scale(deployment=deployment, instances=8)

    assert Deployment.objects.get(pk=deployment.pk).instances == 8


def test_the_api_answers_429_in_its_error_shape_on_create_and_scale(alice):
    created = api(alice).post("/api/deployments", {"model": MODEL, "instances": 3}, format="json")
    assert created.status_code in (200, 201), created.content

    refused = api(alice).post("/api/deployments", {"model": MODEL, "instances": 1}, format="json")
    scaled = api(alice).patch(f"/api/deployments/{created.json()['id']}", {"instances": 4}, format="json")

    for response in (refused, scaled):
        assert response.status_code == 429, response.content
        assert int(response["Retry-After"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "too_many_deployment_instances"
        assert error["param"] == "instances" and "FT_MAX_DEPLOYMENT_SLOTS_PER_USER" in error["message"]
    assert Deployment.objects.get().instances == 3


def test_the_pages_show_the_refusal_beside_the_form(client, alice):
    client.force_login(alice)
    deployment = services.deployment_create(user=alice, model_id=MODEL, instances=2)

    page = client.post("/deployments/", {"model": MODEL, "instances": "2", "max_concurrent_requests": "1"})
    scaled = client.post(f"/deployments/{deployment.public_id}/scale/", {"instances": "4"}, follow=True)

    assert page.status_code == 400
    assert "Too many serving instances: your deployments hold 2 of the 3" in page.content.decode()
    assert "Too many serving instances: your deployments hold 2 of the 3" in scaled.content.decode()
    assert Deployment.objects.get().instances == 2
