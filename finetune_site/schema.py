"""How the OpenAPI schema is put together: the API-key scheme, the plain views, the errors every route answers,
and the /api/paas/v4 mirror.

drf-spectacular describes the DRF views from their `extend_schema`; the hooks here add
what it cannot see. Plain Django views (the chat stream, raw file bytes) are described
by a stand-in APIView each (PLAIN_VIEWS). Every operation gets the errors that any
route can answer (401, 429, and 403 and 413 for writes) once, here, instead of on
each view. The zhipuai mirror serves the same views as /v1, so it is generated once
and copied, with operationIds of its own.
"""

import copy

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.generators import EndpointEnumerator

from datasets_app import api as files_api
from datasets_app.api_schema import FileContent
from deployments_app.chat import api_router as chat_api
from deployments_app.chat import api_schema as chat_schema

from .openapi import ERROR_DESCRIPTIONS

MIRROR_PREFIX = "/api/paas/v4/"
"""The same routes as /v1/, at the path the zhipuai SDK calls."""

PLAIN_VIEWS = {
    files_api.file_content: FileContent,
    chat_api.chat_completions: chat_schema.ChatCompletions,
}
"""Each plain Django view of the API, and the APIView that describes it in the schema."""

NOT_RATE_LIMITED = {"downloadFile"}
"""Operations of plain views that do not count against the requests per minute (DRF's throttle does)."""

TAGS = {
    "files": "Files",
    "fine_tuning": "Fine-tuning",
    "models": "Models",
    "chat": "Chat",
    "evals": "Evals",
    "deployments": "Deployments",
}
"""The tag of each operation, by the first path segment after its prefix."""

MIRROR_TAG = "zhipuai paths (/api/paas/v4)"

COMMON_ERRORS = {
    "401": ("Unauthorized", {"WWW-Authenticate": 'Always `Bearer realm="api"`.'}),
    "403": ("Forbidden", {}),
    "413": ("TooLarge", {}),
    "429": ("TooManyRequests", {"Retry-After": "Seconds to wait before sending it again."}),
}
"""The errors every route may answer, as reusable responses with the headers they carry."""

WRITES = {"post", "put", "patch", "delete"}


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "finetune_site.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API key from the API keys page: `Bearer <key>`."}


class _PlainViewEnumerator(EndpointEnumerator):
    """The routes of PLAIN_VIEWS, with each view swapped for its stand-in."""

    def __init__(self):
        super().__init__()
        self.stand_ins = {view: stand_in.as_view() for view, stand_in in PLAIN_VIEWS.items()}

    def should_include_endpoint(self, path, callback):
        return callback in self.stand_ins

    def get_allowed_methods(self, callback):
        return super().get_allowed_methods(self.stand_ins[callback])

    def endpoints(self) -> list[tuple]:
        return [
            (path, regex, method, self.stand_ins[callback])
            for path, regex, method, callback in self._get_api_endpoints(self.patterns, "")
        ]


def describe_plain_views_once(endpoints, **kwargs):
    """Add the plain views' stand-ins, and leave the mirror out: `mirror_zhipu_paths` copies it afterwards."""
    everything = [*endpoints, *_PlainViewEnumerator().endpoints()]
    return [endpoint for endpoint in everything if not endpoint[0].startswith(MIRROR_PREFIX)]


def add_components(result, generator, request, public):
    """The chat shapes, written as JSON Schema (see deployments_app.chat.api_schema), and the common errors."""
    components = result.setdefault("components", {})
    components.setdefault("schemas", {}).update(chat_schema.COMPONENTS)
    components["responses"] = {
        name: _error_response(status, headers) for status, (name, headers) in COMMON_ERRORS.items()
    }
    return result


def _error_response(status: str, headers: dict) -> dict:
    response = {
        "description": ERROR_DESCRIPTIONS[int(status)],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    if headers:
        response["headers"] = {
            header: {"schema": {"type": "string"}, "description": text} for header, text in headers.items()
        }
    return response


def add_common_errors(result, generator, request, public):
    """401 and 429 on every operation, 403 (CSRF, for session calls) and 413 on writes; a view's own stay."""
    for path, operations in result["paths"].items():
        for method, operation in operations.items():
            statuses = ["401"]
            if operation.get("operationId") not in NOT_RATE_LIMITED:
                statuses.append("429")
            if method in WRITES:
                statuses += ["403", "413"]
            responses = operation["responses"]
            for status in statuses:
                responses.setdefault(status, {"$ref": f"#/components/responses/{COMMON_ERRORS[status][0]}"})
            operation["responses"] = dict(sorted(responses.items()))
            operation["tags"] = [TAGS[path.removeprefix("/v1/").removeprefix("/api/").split("/")[0]]]
    return result


def mirror_zhipu_paths(result, generator, request, public):
    """Every /v1 route again under /api/paas/v4, its operationId suffixed so that each stays unique."""
    mirrored = {}
    for path, operations in result["paths"].items():
        if not path.startswith("/v1/"):
            continue
        copies = copy.deepcopy(operations)
        for operation in copies.values():
            operation["operationId"] += "PaasV4"
            operation["tags"] = [MIRROR_TAG]
            operation["description"] = (
                f"The same as `{path}`, at the path zhipuai's SDK calls.\n\n{operation.get('description', '')}".strip()
            )
        mirrored[MIRROR_PREFIX + path.removeprefix("/v1/")] = copies
    result["paths"].update(mirrored)
    return result
