from django.contrib import admin

from .models import ModelCard


@admin.register(ModelCard)
class ModelCardAdmin(admin.ModelAdmin):
    list_display = ("model_id", "owner", "base_model", "created_at")
    # Files on the server's disk: a path typed here would serve or delete whatever it names.
    readonly_fields = ("path",)
