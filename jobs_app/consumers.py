from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from . import selectors
from .publish import job_group


@database_sync_to_async
def _owned_job(user, public_id):
    if not user or not user.is_authenticated:
        return None
    return selectors.job_for(user, public_id)


@database_sync_to_async
def _points_after(job, step):
    return [p for p in selectors.metric_points(job) if p["step"] > step]


@database_sync_to_async
def _status_now(job):
    return type(job).objects.filter(pk=job.pk).values_list("status", flat=True).first()


class JobConsumer(AsyncJsonWebsocketConsumer):
    """Forwards a job's live metrics, events and status to the page watching it."""

    async def connect(self):
        self.job = await _owned_job(self.scope.get("user"), self.scope["url_route"]["kwargs"]["public_id"])
        if self.job is None:
            await self.close(code=4404)
            return
        self.group = job_group(self.job.public_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    @classmethod
    async def decode_json(cls, text_data):
        try:
            return await super().decode_json(text_data)
        except ValueError:  # not JSON: nothing this consumer understands, so nothing to do
            return None

    async def receive_json(self, content, **kwargs):
        # A page that rendered history up to step N asks for what it missed
        # between rendering and joining the group. Anything else is ignored: a
        # malformed message from one page must not close its live view.
        if not isinstance(content, dict) or content.get("type") != "sync":
            return
        after = content.get("after_step") or 0
        if isinstance(after, bool) or not isinstance(after, int):
            return
        for point in await _points_after(self.job, after):
            await self.send_json({"type": "eval" if "valid_loss" in point else "metric", **point})
        # The status too: a job that started (or ended) meanwhile sent its news to nobody.
        status = await _status_now(self.job)
        if status:
            await self.send_json({"type": "status", "status": status})

    async def job_update(self, event):
        await self.send_json(event["payload"])
