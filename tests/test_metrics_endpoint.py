"""GET /metrics: Prometheus text of every live instance's load and the shared pool's, for staff or a token only."""

import re

import pytest
from django.contrib.auth import get_user_model

from deployments_app.models import Deployment, Instance
from finetune_site.models import ApiKey

from .test_deployments import alice, bob  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.django_db

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)(?: (-?\d+))?$")


def parse_prometheus_text(text: str) -> dict[str, dict]:
    """Families by name, {"type", "help", "samples": [(labels, value)]}; AssertionError on any bad line.

    Follows the text exposition format 0.0.4: HELP and TYPE at most once per family,
    TYPE before its samples, samples of one family together, label values escaped.
    """
    assert text.endswith("\n"), "the last line must end with a newline"
    families: dict[str, dict] = {}
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert re.fullmatch(_NAME, name), f"line {number}: bad name {name!r}"
                family = families.setdefault(name, {"type": None, "help": None, "samples": []})
                key = parts[1].lower()
                assert family[key] is None, f"line {number}: a second {parts[1]} for {name}"
                assert not family["samples"], f"line {number}: {parts[1]} after samples of {name}"
                family[key] = parts[3] if len(parts) > 3 else ""
                if key == "type":
                    assert family["type"] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                current = name
            continue
        match = _SAMPLE.match(line)
        assert match, f"line {number} is not a sample: {line!r}"
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        assert name == current, f"line {number}: {name} is not next to its TYPE line"
        float(value)  # NaN, +Inf and -Inf parse too
        parsed = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
        families[name]["samples"].append((parsed, float(value)))
    return families


@pytest.fixture
def staff():
    return get_user_model().objects.create_user("charlie", password="pw-charlie-123", is_staff=True)


@pytest.fixture
def serving(alice):
    deployment = Deployment.objects.create(owner=alice, model_id="tiny-random-smollm2", instances=2)
    busy = Instance.objects.create(
        deployment=deployment,
        status=Instance.RUNNING,
        queue_depth=3,
        running_requests=2,
        recent_tokens_per_second=41.5,
        first_token_p50_ms=120.0,
        first_token_p95_ms=300.0,
        requests_served=7,
    )
    loading = Instance.objects.create(deployment=deployment, status=Instance.STARTING)
    gone = Instance.objects.create(deployment=deployment, status=Instance.DEAD, queue_depth=9)
    return deployment, busy, loading, gone


def test_it_refuses_anonymous_callers_with_401(client, serving):
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"dep-" not in response.content


def test_it_refuses_a_user_who_is_not_staff(client, alice, serving):
    client.force_login(alice)  # alice owns the deployment, yet /metrics names everyone's
    response = client.get("/metrics")
    assert response.status_code == 403
    assert b"dep-" not in response.content


def test_a_user_api_key_is_not_the_metrics_token(client, alice, serving, settings):
    settings.FT_METRICS_TOKEN = "scrape-secret"
    _, raw = ApiKey.issue(alice, name="k")
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401
    settings.FT_METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401


def test_it_answers_the_metrics_token(client, serving, settings):
    settings.FT_METRICS_TOKEN = "scrape-secret"
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")


def test_it_shows_staff_each_live_instance_and_the_shared_pool(client, staff, serving):
    deployment, busy, loading, gone = serving
    client.force_login(staff)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    families = parse_prometheus_text(response.content.decode())

    def value(name, **labels):
        found = [v for got, v in families[name]["samples"] if got == labels]
        assert len(found) == 1, (name, labels, families[name]["samples"])
        return found[0]

    ids = {"deployment": deployment.public_id, "instance": busy.public_id}
    assert families["ft_instance_queue_depth"]["type"] == "gauge"
    assert value("ft_instance_queue_depth", **ids) == 3
    assert value("ft_instance_running_requests", **ids) == 2
    assert value("ft_instance_tokens_per_second", **ids) == 41.5
    assert value("ft_instance_first_token_latency_seconds", **ids, quantile="0.5") == 0.12
    assert value("ft_instance_first_token_latency_seconds", **ids, quantile="0.95") == 0.3
    assert value("ft_instance_requests_total", **ids) == 7
    assert value("ft_instance_up", **ids) == 1
    assert value("ft_instance_up", deployment=deployment.public_id, instance=loading.public_id) == 0
    assert value("ft_instance_queue_depth", instance="shared") == 0
    assert value("ft_instance_running_requests", instance="shared") == 0
    listed = {labels.get("instance") for family in families.values() for labels, _ in family["samples"]}
    assert gone.public_id not in listed  # only live instances


def test_label_values_are_escaped(client, staff, serving):
    _, busy, _, _ = serving
    Instance.objects.filter(pk=busy.pk).update(public_id='inst-"odd"\\\nname')
    client.force_login(staff)
    families = parse_prometheus_text(client.get("/metrics").content.decode())
    names = {labels["instance"] for labels, _ in families["ft_instance_up"]["samples"]}
    assert 'inst-\\"odd\\"\\\\\\nname' in names
