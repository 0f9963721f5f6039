from django.contrib import admin

from .models import Eval, EvalRun


@admin.register(Eval)
class EvalAdmin(admin.ModelAdmin):
    list_display = ("public_id", "name", "owner", "kind", "job", "created_at")
    list_filter = ("kind",)
    search_fields = ("public_id", "name", "owner__username")


@admin.register(EvalRun)
class EvalRunAdmin(admin.ModelAdmin):
    list_display = ("public_id", "eval", "owner", "model", "status", "done", "total", "created_at")
    list_filter = ("status",)
    search_fields = ("public_id", "model", "owner__username")
    # The worker's: cancel and resume go through evals_app.services.
    readonly_fields = ("status", "control", "done", "total", "attempts", "heartbeat_at")
