"""GET /metrics: serving load in Prometheus text format (exposition format 0.0.4), written by hand.

One series per live deployment instance, labelled by deployment and instance
public ids, from what each instance wrote at its last heartbeat; plus this web
process's shared pool (chat without a deployment), labelled instance="shared".

Who may read it: a staff user's session, or `Authorization: Bearer <FT_METRICS_TOKEN>`
when that setting is set (for a Prometheus scraper). Everybody else is refused,
since the labels name every user's deployments.
"""

import hmac
import math

from django.conf import settings
from django.http import HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from deployments_app.chat.pool import get_pool
from deployments_app.models import Instance

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> (type, help, the value for one instance row: None leaves the series out)
_INSTANCE_METRICS = {
    "ft_instance_up": (
        "gauge",
        "1 while the instance serves, 0 while it loads or stops.",
        lambda i: int(i.status == Instance.RUNNING),
    ),
    "ft_instance_queue_depth": ("gauge", "Requests waiting to join the running batch.", lambda i: i.queue_depth),
    "ft_instance_running_requests": ("gauge", "Rows in the running batch.", lambda i: i.running_requests),
    "ft_instance_tokens_per_second": (
        "gauge",
        "Tokens generated per second over the last 10 s.",
        lambda i: i.recent_tokens_per_second,
    ),
    "ft_instance_heartbeat_age_seconds": (
        "gauge",
        "Seconds since the instance last reported.",
        lambda i: (timezone.now() - i.heartbeat_at).total_seconds() if i.heartbeat_at else None,
    ),
    "ft_instance_requests_total": ("counter", "Requests the instance answered.", lambda i: i.requests_served),
    "ft_instance_tokens_generated_total": ("counter", "Tokens the instance generated.", lambda i: i.tokens_generated),
    "ft_instance_errors_total": ("counter", "Requests the instance failed.", lambda i: i.errors),
}
_FIRST_TOKEN = "ft_instance_first_token_latency_seconds"
_FIRST_TOKEN_HELP = "First-token latency over recent requests, by quantile."
_SHARED = {"ft_instance_queue_depth", "ft_instance_running_requests", "ft_instance_tokens_per_second"}


@require_GET
def metrics(request):
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(render_metrics(), content_type=CONTENT_TYPE)


def _refusal(request) -> HttpResponse | None:
    token = settings.FT_METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if header:
        given = header.removeprefix("Bearer ").strip()
        if token and hmac.compare_digest(given.encode(), token.encode()):
            return None
        return _refused("The metrics token is wrong.", 401)
    if request.user.is_authenticated:
        return None if request.user.is_staff else _refused("Only staff may read /metrics.", 403)
    return _refused("Log in as staff, or send Authorization: Bearer <FT_METRICS_TOKEN>.", 401)


def _refused(message: str, status: int) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


def render_metrics() -> str:
    """The text exposition of every live instance's load and the shared pool's."""
    instances = list(
        Instance.objects.filter(status__in=Instance.LIVE).select_related("deployment").order_by("deployment_id", "id")
    )
    shared = get_pool().load_stats()
    shared_values = {
        "ft_instance_queue_depth": shared.get("queue_depth"),
        "ft_instance_running_requests": shared.get("running"),
        "ft_instance_tokens_per_second": shared.get("tokens_per_second"),
    }
    lines: list[str] = []
    for name, (kind, help_text, value_of) in _INSTANCE_METRICS.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for instance in instances:
            lines += _sample(
                name, {"deployment": instance.deployment.public_id, "instance": instance.public_id}, value_of(instance)
            )
        if name in _SHARED:
            lines += _sample(name, {"instance": "shared"}, shared_values[name])
    lines += [f"# HELP {_FIRST_TOKEN} {_FIRST_TOKEN_HELP}", f"# TYPE {_FIRST_TOKEN} gauge"]
    for quantile, field in (("0.5", "first_token_p50_ms"), ("0.95", "first_token_p95_ms")):
        for instance in instances:
            labels = {"deployment": instance.deployment.public_id, "instance": instance.public_id, "quantile": quantile}
            lines += _sample(_FIRST_TOKEN, labels, _seconds(getattr(instance, field)))
        lines += _sample(_FIRST_TOKEN, {"instance": "shared", "quantile": quantile}, _seconds(shared.get(field)))
    return "\n".join(lines) + "\n"


def _sample(name: str, labels: dict[str, str], value) -> list[str]:
    if value is None:
        return []
    rendered = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
    return [f"{name}{{{rendered}}} {_number(value)}"]


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() else repr(value)


def _seconds(milliseconds) -> float | None:
    return None if milliseconds is None else float(milliseconds) / 1000
