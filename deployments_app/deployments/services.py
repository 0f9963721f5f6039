"""Writes for deployments: create, scale, cancel, and reconcile instances with what each deployment wants."""

import logging
import signal
from datetime import timedelta

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from finetune_site import quotas
from finetune_site.errors import CapacityExceeded, InvalidInput, InvalidState
from finetune_site.locks import hold_until_commit
from llm.serve.vllm import BACKENDS

from ..catalog import resolve_model
from ..models import Deployment, Instance
from . import streams

log = logging.getLogger(__name__)


def cancel_deployments_of(owner, model_id: str, *, checkpoints_only: bool = False) -> None:
    """Cancel the active deployments of a model and of its checkpoints (`...:ckpt-step-N`), before their files go."""
    wanted = Q(model_id__startswith=f"{model_id}:ckpt-step-")
    if not checkpoints_only:
        wanted |= Q(model_id=model_id)
    for deployment in Deployment.objects.owned_by(owner).active().filter(wanted):
        deployment_cancel(deployment=deployment)


def _check_whole_number(value, name: str, top: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise InvalidInput(f"{name} must be a whole number from 1 to {top}, got {value!r}.", param=name)


def _check_counts(instances, max_concurrent_requests=None) -> None:
    _check_whole_number(instances, "instances", settings.FT_MAX_INSTANCES)
    if max_concurrent_requests is not None:
        _check_whole_number(max_concurrent_requests, "max_concurrent_requests", 64)


def _check_backend(backend, tensor_parallel_size) -> None:
    if backend and backend not in BACKENDS:
        raise InvalidInput(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.", param="backend")
    _check_whole_number(tensor_parallel_size, "tensor_parallel_size", 64)
    if tensor_parallel_size > 1 and (backend or settings.FT_SERVING_BACKEND) == "embedded":
        raise InvalidInput(
            "tensor_parallel_size above 1 needs the vLLM backend; the embedded engine runs each instance on one device.",
            param="tensor_parallel_size",
        )


def _check_capacity(extra: int) -> None:
    """Refuse to want more instances than the serving worker has threads (FT_SERVING_SLOTS).

    Every instance is a task that holds one worker-serve thread (which watches the
    instance's process) for as long as it serves, whichever deployment it belongs to; one more than there are threads waits
    in the queue until its start timeout, is replaced, and never serves.
    """
    if extra <= 0:
        return
    hold_until_commit("serving-capacity")  # held until commit; taking it again in one transaction is free
    slots = settings.FT_SERVING_SLOTS
    in_use = Instance.objects.filter(
        status__in=(Instance.STARTING, Instance.RUNNING), deployment__in=Deployment.objects.active()
    ).count()
    if in_use + extra > slots:
        raise CapacityExceeded(
            f"Not enough serving capacity: {in_use} of {slots} instance slots are in use (FT_SERVING_SLOTS); "
            f"this needs {extra} more.",
            param="instances",
            code="insufficient_capacity",
        )


def _start_instances(deployment: Deployment, count: int) -> list[Instance]:
    from ..tasks import run_instance

    created = [Instance.objects.create(deployment=deployment) for _ in range(count)]
    for instance in created:
        transaction.on_commit(lambda pk=instance.pk: run_instance.delay(pk))
    return created


@transaction.atomic
def deployment_create(
    *,
    user,
    model_id: str,
    instances: int = 1,
    max_concurrent_requests: int = 1,
    backend: str = "",
    tensor_parallel_size: int = 1,
) -> Deployment:
    """Deploy a base, fine-tuned or checkpoint model on N dedicated instances.

    backend: "auto", "embedded" or "vllm" ("": FT_SERVING_BACKEND's); tensor_parallel_size: GPUs per instance (vLLM).
    """
    _check_counts(instances, max_concurrent_requests)
    _check_backend(backend, tensor_parallel_size)
    if not isinstance(model_id, str) or resolve_model(user, model_id) is None:
        # A 400, not a 404: the model is a field of what is being created, as in OpenAI's create calls.
        raise InvalidInput(
            f"The model {model_id!r} does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    hold_until_commit("serving-capacity")  # before counting: two creates at once would count the same
    quotas.check_deployment_slots(user, instances)
    _check_capacity(instances)
    deployment = Deployment.objects.create(
        owner=user,
        model_id=model_id,
        instances=instances,
        max_concurrent_requests=max_concurrent_requests,
        backend=backend,
        tensor_parallel_size=tensor_parallel_size,
    )
    _start_instances(deployment, instances)
    return deployment


@transaction.atomic
def deployment_scale(*, deployment: Deployment, instances: int) -> Deployment:
    """Change how many instances serve the deployment; requests in flight always finish."""
    _check_counts(instances)
    # Before counting: a scale that raced another one would count instances it is about to change.
    hold_until_commit("serving-capacity")
    deployment.refresh_from_db()
    if not deployment.is_active:
        raise InvalidState(
            f"The deployment is {deployment.status}; only a deploying or running deployment can be scaled.",
            param="instances",
        )
    quotas.check_deployment_slots(deployment.owner_id, instances - deployment.instances)
    serving = deployment.instance_set.filter(status__in=(Instance.STARTING, Instance.RUNNING)).count()
    _check_capacity(instances - serving)
    deployment.instances = instances
    deployment.updated_at = timezone.now()
    deployment.save(update_fields=["instances", "updated_at"])
    _reconcile(deployment)
    return deployment


@transaction.atomic
def deployment_cancel(*, deployment: Deployment) -> Deployment:
    """Stop every instance: answers still running end with finish_reason "cancelled", the processes end."""
    if deployment.status in (Deployment.CANCELLED, Deployment.FAILED):
        return deployment
    now = timezone.now()
    deployment.status, deployment.finished_at, deployment.updated_at = Deployment.CANCELLED, now, now
    deployment.save(update_fields=["status", "finished_at", "updated_at"])
    _stop(deployment.instance_set.filter(status__in=(Instance.STARTING, Instance.RUNNING)))
    return deployment


def _stop(instances) -> None:
    # A starting instance has not taken a request: it stops at once (its claim will fail).
    instances.filter(status=Instance.STARTING).update(
        status=Instance.STOPPED, stopped_at=timezone.now(), detail="Stopped before it finished loading."
    )
    instances.filter(status=Instance.RUNNING).update(status=Instance.STOPPING)


def _reconcile(deployment: Deployment) -> None:
    """Start or stop instances until as many are starting or running as are wanted."""
    # The reconciler and a supervisor whose instance died may both replace it: one at a time.
    hold_until_commit("serving-capacity")
    deployment.refresh_from_db(fields=["instances", "status"])
    if not deployment.is_active:
        return
    serving = list(deployment.instance_set.filter(status__in=(Instance.STARTING, Instance.RUNNING)).order_by("id"))
    missing = deployment.instances - len(serving)
    if missing > 0:
        _start_instances(deployment, missing)
    elif missing < 0:
        # Stop the ones still loading first, then the newest running ones.
        excess = sorted(serving, key=lambda i: (i.status != Instance.STARTING, -i.pk))[:-missing]
        _stop(Instance.objects.filter(pk__in=[i.pk for i in excess]))
    deployment.mark_running_if_ready()


def reconcile_deployments() -> dict:
    """Mark instances without a recent heartbeat dead, then replace or stop instances to match each deployment."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.FT_HEARTBEAT_TIMEOUT)
    never_loaded = now - timedelta(seconds=settings.FT_INSTANCE_START_TIMEOUT)
    silent = Q(status__in=(Instance.RUNNING, Instance.STOPPING), heartbeat_at__lt=stale)
    dead = Instance.objects.filter(silent | Q(status=Instance.STARTING, created_at__lt=never_loaded))
    dead_ids = list(dead.values_list("public_id", flat=True))
    serving_ids = list(dead.filter(silent).values_list("pk", flat=True))
    dead.update(status=Instance.DEAD, stopped_at=now, detail="No heartbeat: the instance or its worker died.")
    for instance in Instance.objects.select_related("deployment").filter(pk__in=serving_ids, status=Instance.DEAD):
        _end_begun_answers(instance)
    replaced = 0
    for deployment in Deployment.objects.active():
        with transaction.atomic():
            before = deployment.instance_set.count()
            _reconcile(deployment)
            replaced += deployment.instance_set.count() - before
    return {"dead": dead_ids, "started": replaced}


def instance_process_ended(*, instance_id: int, exit_status: int) -> None:
    """Record that an instance's process ended; if it died, end the answers it had begun and replace it.

    A process that ends on its own has already marked its row stopped or dead;
    one killed (SIGKILL, out of memory) or crashed has not, and is marked dead here.
    """
    instance = Instance.objects.select_related("deployment").filter(pk=instance_id).first()
    if instance is None:
        return
    if instance.status == Instance.STARTING and exit_status != 0:
        # Killed or crashed while loading (out of memory, most often): a replacement would do the same.
        instance_failed_to_load(
            instance=instance, message=f"{_describe_exit(exit_status)[:-1]} while it loaded the model."
        )
        return
    instance.mark_final(Instance.DEAD, _describe_exit(exit_status))
    _end_begun_answers(instance)
    with transaction.atomic():
        deployment = Deployment.objects.get(pk=instance.deployment_id)
        if deployment.is_active:
            _reconcile(deployment)


def instance_failed_to_load(*, instance: Instance, message: str) -> None:
    """A model that cannot load will not load on a replacement either: fail the deployment, stop its instances."""
    now = timezone.now()
    instance.mark_final(Instance.DEAD, message)
    Deployment.objects.filter(pk=instance.deployment_id, status__in=(Deployment.DEPLOYING, Deployment.RUNNING)).update(
        status=Deployment.FAILED, error=message, finished_at=now, updated_at=now
    )
    siblings = Instance.objects.filter(deployment_id=instance.deployment_id)
    siblings.filter(status=Instance.STARTING).update(status=Instance.STOPPED, stopped_at=now)
    siblings.filter(status=Instance.RUNNING).update(status=Instance.STOPPING)


def _describe_exit(exit_status: int) -> str:
    if exit_status < 0:
        try:
            name = signal.Signals(-exit_status).name
        except ValueError:
            name = f"signal {-exit_status}"
        return f"The instance process was killed by {name}."
    return f"The instance process ended with exit status {exit_status}."


def _end_begun_answers(instance: Instance) -> None:
    """Answers the dead instance had begun end with an error event; the rest are left for another instance."""
    client = streams.sync_client()
    try:
        ended = streams.fail_begun_requests(
            client, instance.deployment.stream_key, instance.public_id, streams.STOPPED_MID_ANSWER
        )
    except redis.RedisError:  # the rows matter more; the callers' own idle timeout ends those answers
        log.warning("could not end the answers begun by %s", instance.public_id, exc_info=True)
    else:
        if ended:
            log.info("ended %d answers begun by %s, which died", ended, instance.public_id)
    finally:
        client.close()
