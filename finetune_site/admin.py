from django.contrib import admin

from .models import ApiKey, Notification


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("key_id", "user", "name", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("key_id", "key_hash")


admin.site.register(Notification)
