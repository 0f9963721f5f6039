from django.contrib import admin

from .models import Dataset


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("public_id", "filename", "owner", "status", "examples", "bytes", "created_at")
    list_filter = ("status",)
