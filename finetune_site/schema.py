"""OpenAPI schema details: the API-key scheme, and one copy of the mirrored routes."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "finetune_site.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API key from the API keys page: `Bearer <key>`."}


def drop_zhipu_mirror(endpoints, **kwargs):
    """/api/paas/v4/ serves the same views as /v1/; document them once."""
    return [endpoint for endpoint in endpoints if not endpoint[0].startswith("/api/paas/v4/")]
