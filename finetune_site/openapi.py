"""Building blocks of the API's OpenAPI schema: the error body, list pages, cursor parameters, fixed values.

The schema is a contract that tests/test_openapi_contract.py holds the live API to, so
each block here describes one piece of code and says which: ErrorBody is
`api_errors.error_body`, `page_of` is `pagination.cursor_page`. The errors every route
can answer (401, 429, ...) are added to each operation once, by `schema.add_common_errors`;
an operation declares only its own (`errors(400, 404)`).
"""

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema_field
from rest_framework import serializers

from .api_errors import ERROR_TYPES
from .metadata import METADATA_LIMITS

ERROR_DESCRIPTIONS = {
    400: "Bad input, or the thing is not in a state that allows this; `param` names the field at fault.",
    401: "No API key, or a wrong one (answered with `WWW-Authenticate: Bearer`).",
    403: "Not allowed: a call signed in with a session cookie but without its CSRF token, "
    "or a change nobody may make (deleting a base model).",
    404: "No such thing, or it is not yours (the two are never told apart).",
    413: "The body is larger than this installation accepts.",
    429: "Too many requests or tokens this minute, or too many open streams: retry after `Retry-After` seconds.",
    500: "The model failed while answering (sent with `x-should-retry: false`).",
    503: "No serving instance took the request in time; the same request may work later.",
    504: "What took the request stopped answering before it was done.",
}
"""What each error status means on this API, whatever the route."""


class Const(serializers.CharField):
    """A string that always holds one value, like `object: "file"`: documented as a one-value enum."""

    def __init__(self, value: str, **kwargs):
        self.value = value
        super().__init__(**kwargs)


class Choice(serializers.CharField):
    """A string with a fixed set of values, documented inline (DRF's ChoiceField makes a named component
    per field name, and `status` means something else on every object)."""

    def __init__(self, values, **kwargs):
        self.values = list(values)
        super().__init__(**kwargs)


class ConstSchema(OpenApiSerializerFieldExtension):
    target_class = Const

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "string", "enum": [self.target.value]}


class ChoiceSchema(OpenApiSerializerFieldExtension):
    target_class = Choice

    def map_serializer_field(self, auto_schema, direction):
        # null must be one of the values too, or a nullable enum would refuse it.
        values = [*self.target.values, *([None] if self.target.allow_null else [])]
        return {"type": "string", "enum": values}


@extend_schema_field(
    {
        "type": "object",
        "maxProperties": METADATA_LIMITS["keys"],
        "propertyNames": {"maxLength": METADATA_LIMITS["key_chars"]},
        "additionalProperties": {"type": "string", "maxLength": METADATA_LIMITS["value_chars"]},
        "description": f"Up to {METADATA_LIMITS['keys']} string pairs of your own (`metadata.check_metadata`).",
    }
)
class MetadataField(serializers.JSONField):
    """`metadata` on jobs and evals: taken as JSON, checked by the services."""


class ErrorDetail(serializers.Serializer):
    message = serializers.CharField(help_text="What went wrong, written for the user.")
    type = Choice(sorted({*ERROR_TYPES.values(), "server_error"}))
    param = serializers.CharField(
        allow_null=True, help_text="The request field at fault, like `hyperparameters.n_epochs`."
    )
    code = serializers.CharField(allow_null=True, help_text="A stable machine-readable reason, like `not_found`.")


class ErrorBody(serializers.Serializer):
    """Every refusal of the API (`finetune_site.api_errors.error_body`)."""

    error = ErrorDetail()


def errors(*statuses: int) -> dict:
    """The error responses an operation declares for itself, for extend_schema's `responses`."""
    return {status: OpenApiResponse(ErrorBody, description=ERROR_DESCRIPTIONS[status]) for status in statuses}


def page_of(item: type[serializers.Serializer], name: str) -> type[serializers.Serializer]:
    """The schema of a `pagination.cursor_page` of item: a page named name."""
    return type(
        name,
        (serializers.Serializer,),
        {
            "__doc__": f"A page of {item.__name__} objects, newest first; pass `last_id` as `after` for the next.",
            "object": Const("list"),
            "data": item(many=True),
            "has_more": serializers.BooleanField(help_text="Whether another page follows this one."),
            "first_id": serializers.CharField(allow_null=True),
            "last_id": serializers.CharField(allow_null=True),
        },
    )


def list_of(item: type[serializers.Serializer], name: str) -> type[serializers.Serializer]:
    """The schema of a whole list (not paged): `{"object": "list", "data": [...]}`."""
    return type(
        name,
        (serializers.Serializer,),
        {"__doc__": f"Every {item.__name__}.", "object": Const("list"), "data": item(many=True)},
    )


def cursor_parameters(*, default_limit: int = 20, max_limit: int = 100) -> list[OpenApiParameter]:
    """The query parameters `pagination.cursor_page` reads, with its bounds."""
    return [
        OpenApiParameter(
            "after", OpenApiTypes.STR, description="The id of the last item of the previous page (its `last_id`)."
        ),
        OpenApiParameter(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": max_limit, "default": default_limit},
            description="How many items the page holds at most.",
        ),
    ]


def path_parameter(name: str, description: str) -> OpenApiParameter:
    return OpenApiParameter(name, OpenApiTypes.STR, OpenApiParameter.PATH, description=description)
