"""One error shape for the whole API: {"error": {"message", "type", "param", "code"}}.

This is where domain errors (`finetune_site.errors`) become HTTP statuses for the
API: DRF views through `exception_handler`, the plain async views (chat, the
playground's JSON endpoints) through `application_error_response`.
"""

import logging
import math

from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from .errors import (
    ApplicationError,
    Busy,
    CapacityExceeded,
    InvalidInput,
    InvalidState,
    ModelFailed,
    NotAllowed,
    NotFound,
    TimedOut,
    TooLarge,
    Unavailable,
)

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


# The status of each kind of domain error; a kind not listed (ApplicationError itself) is a 400.
_STATUS_OF_ERROR: dict[type[ApplicationError], int] = {
    InvalidInput: 400,
    InvalidState: 400,
    CapacityExceeded: 400,
    Busy: 429,
    NotFound: 404,
    NotAllowed: 403,
    TooLarge: 413,
    ModelFailed: 500,
    Unavailable: 503,
    TimedOut: 504,
}


def status_of(error: ApplicationError) -> int:
    """The HTTP status a domain error is answered with."""
    return next((_STATUS_OF_ERROR[kind] for kind in type(error).__mro__ if kind in _STATUS_OF_ERROR), 400)


class ApiError(exceptions.APIException):
    """An error of the API layer itself (a bad query parameter, a body that is not JSON).

    Services raise domain errors (`finetune_site.errors`) instead.
    """

    def __init__(self, message: str, *, status_code: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code


def error_body(message: str, *, status_code: int, param=None, code=None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(message: str, *, status_code: int = 400, param=None, code=None) -> JsonResponse:
    """The error shape as a plain Django response, for views outside DRF."""
    response = JsonResponse(error_body(message, status_code=status_code, param=param, code=code), status=status_code)
    if status_code == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    if status_code >= 500:
        response["x-should-retry"] = "false"
    return response


def application_error_response(error: ApplicationError) -> JsonResponse:
    """A domain error in the API's shape, for views outside DRF."""
    response = error_response(error.message, status_code=status_of(error), param=error.param, code=error.code)
    _say_when_to_retry(response, error)
    return response


def _say_when_to_retry(response, error: ApplicationError) -> None:
    if isinstance(error, Busy):
        response["Retry-After"] = str(max(1, math.ceil(error.retry_after)))


def _first_validation_message(detail, prefix: str = "") -> tuple[str, str | None]:
    if isinstance(detail, dict):
        for field, value in detail.items():
            name = field if field != "non_field_errors" else ""
            path = f"{prefix}.{name}" if prefix and name else (name or prefix)
            message, param = _first_validation_message(value, path)
            return message, param
    if isinstance(detail, list) and detail:
        return _first_validation_message(detail[0], prefix)
    text = str(detail)
    return (f"{prefix}: {text}" if prefix else text), (prefix or None)


def exception_handler(exc, context):
    if isinstance(exc, ApplicationError):
        result = _respond(exc.message, status_of(exc), exc.param, exc.code)
        _say_when_to_retry(result, exc)
        return result
    if isinstance(exc, ApiError):
        return _respond(exc.message, exc.status_code, exc.param, exc.code)
    if isinstance(exc, Http404):
        return _respond(str(exc) or "Not found.", 404, None, "not_found")
    if isinstance(exc, exceptions.ValidationError):
        message, param = _first_validation_message(exc.detail)
        return _respond(message, 400, param, "invalid_value")
    response = drf_exception_handler(exc, context)
    if response is None:
        log.exception("unhandled API error", exc_info=exc)
        return _respond("The server had an error while processing your request.", 500, None, "server_error")
    detail = response.data.get("detail", response.data) if isinstance(response.data, dict) else response.data
    result = _respond(str(detail), response.status_code, None, getattr(exc, "default_code", None))
    for header in ("WWW-Authenticate", "Retry-After"):
        if header in response:
            result[header] = response[header]
    return result


def _respond(message, status_code, param, code) -> Response:
    response = Response(error_body(message, status_code=status_code, param=param, code=code), status=status_code)
    if status_code == status.HTTP_401_UNAUTHORIZED:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    if status_code >= 500:
        response["x-should-retry"] = "false"
    return response
