"""Domain errors on pages: the one place a page turns a service's refusal into a response.

A form post that a service refuses comes back to the page it was sent from with
the reason as a message, so nothing the user typed elsewhere on the page is
lost to a bare error page. Without a Referer it goes where the view named with
`refusals_go_to`, else to the parent path: action URLs here end in a verb under
the page they act on (/jobs/<id>/cancel/ -> /jobs/<id>/). A NotFound is a 404
page on every method, as a missing page always was. Other requests get a small
page with the reason and the status the API would give. API routes are left to
the API's own mapping (`finetune_site.api_errors`).
"""

from functools import wraps

from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.deprecation import MiddlewareMixin
from django.utils.http import url_has_allowed_host_and_scheme

from .api_errors import application_error_response, status_of
from .errors import ApplicationError, NotFound

_API_PREFIXES = ("/v1/", "/api/")


class ApplicationErrorMiddleware(MiddlewareMixin):
    def process_exception(self, request, exception):
        if not isinstance(exception, ApplicationError):
            return None
        if request.path.startswith(_API_PREFIXES):
            return application_error_response(exception)
        if request.method == "POST" and not getattr(request, "htmx", False) and not isinstance(exception, NotFound):
            messages.error(request, exception.message)
            return redirect(_back(request))
        status = status_of(exception)
        return render(request, "error.html", {"message": exception.message, "status": status}, status=status)


def refusals_go_to(url_name: str):
    """Decorate a page view whose refusals, posted without a Referer, go back to the page `url_name`."""

    def decorate(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            request.refusals_go_to = reverse(url_name)
            return view(request, *args, **kwargs)

        return wrapped

    return decorate


def _back(request) -> str:
    """The page the form was posted from, when it is one of ours; else the view's named page or the parent path."""
    referer = request.headers.get("Referer", "")
    if referer and url_has_allowed_host_and_scheme(referer, allowed_hosts={request.get_host()}):
        return referer
    return getattr(request, "refusals_go_to", None) or request.path.rstrip("/").rsplit("/", 1)[0] + "/"
