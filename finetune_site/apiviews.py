"""Helpers for API views that live outside DRF (streams, raw downloads)."""

from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import AuthenticationFailed

from .api_errors import error_response
from .auth import authenticate_api_key


def api_user_or_error(request):
    """(user, None) for a valid key or session, else (None, the 401 response)."""
    header = request.META.get("HTTP_AUTHORIZATION")
    if header:
        try:
            user = authenticate_api_key(header)
        except AuthenticationFailed as exc:
            return None, error_response(str(exc.detail), status_code=401, code="invalid_api_key")
        request.user = user  # as DRF's views do: the access log names who called
        return user, None
    if request.user.is_authenticated:
        return request.user, None
    return None, error_response(
        "Missing API key: send Authorization: Bearer <key>.", status_code=401, code="invalid_api_key"
    )


def session_csrf_error(request):
    """None for a call with an API key or a valid CSRF token, else the 403 response.

    Browser calls ride on the session cookie, so they must carry the CSRF token; a
    call with an API key sends no cookie and needs none.
    """
    if "HTTP_AUTHORIZATION" in request.META:
        return None
    reason = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
    return error_response("CSRF check failed for a session-authenticated call.", status_code=403) if reason else None


@csrf_exempt
def unsupported_endpoint(request, rest):
    """Any other route under an API prefix: OpenAI's error shape naming it, not the HTML 404 page.

    The SDKs raise NotFoundError either way, but only this one says what happened.
    """
    prefix = request.path[: len(request.path) - len(rest)]
    return error_response(
        f"{request.method} {request.path} is not an endpoint of Finetune Console. It serves files, fine_tuning/jobs, "
        f"models, chat/completions and evals under {prefix}; the OpenAPI schema at /api/schema/ lists them all.",
        status_code=404,
        code="unsupported_endpoint",
    )
