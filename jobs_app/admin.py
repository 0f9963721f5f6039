from django.contrib import admin

from .models import Checkpoint, FineTuningJob


@admin.register(FineTuningJob)
class FineTuningJobAdmin(admin.ModelAdmin):
    list_display = ("public_id", "owner", "base_model", "objective", "status", "step", "total_steps", "created_at")
    list_filter = ("status", "objective")
    # The status changes only through jobs_app.transitions (its guards keep workers consistent);
    # the worker's fields and the run's folder are the worker's.
    readonly_fields = ("status", "control", "worker", "attempts", "heartbeat_at", "step", "total_steps")


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ("job", "step", "created_at")
    readonly_fields = ("path",)  # a file on the server's disk
