from django.contrib import admin

from .models import Checkpoint, FineTuningJob


@admin.register(FineTuningJob)
class FineTuningJobAdmin(admin.ModelAdmin):
    list_display = ("public_id", "owner", "base_model", "status", "step", "total_steps", "created_at")
    list_filter = ("status",)


admin.site.register(Checkpoint)
