"""Model pickers (playground, deployments) offer what links ask for, and only the user's own models."""

import pytest
from django.contrib.auth import get_user_model

from deployments_app.catalog.selectors import RECENT_CHECKPOINTS, model_choices
from jobs_app.models import Checkpoint

from .test_jobs_api import alice, dataset  # noqa: F401 - shared fixtures
from .test_jobs_pages import make_job, models_dir  # noqa: F401

pytestmark = pytest.mark.django_db


def test_a_linked_old_checkpoint_is_offered_to_its_owner_only(client, alice, dataset, tmp_path):
    job = make_job(alice, dataset, status="succeeded", suffix="s")
    for step in range(1, RECENT_CHECKPOINTS + 6):
        Checkpoint.objects.create(job=job, step=step, path=str(tmp_path / f"step-{step}"))
    oldest = Checkpoint.objects.get(job=job, step=1).model_id
    assert oldest not in model_choices(alice)  # past the recent ones
    assert oldest in model_choices(alice, [oldest])

    client.force_login(alice)
    assert f'value="{oldest}"' in client.get("/playground/", {"b": oldest}).content.decode()
    assert f'value="{oldest}"' in client.get("/deployments/", {"model": oldest}).content.decode()

    bob = get_user_model().objects.create_user("bob", password="pw-bob-123")
    assert oldest not in model_choices(bob, [oldest, "made-up-model"])
