from django.contrib import admin

from .models import ModelCard

admin.site.register(ModelCard)
