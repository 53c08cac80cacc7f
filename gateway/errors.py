"""What Django answers before or instead of a view, as the API's JSON error: an unknown path, a
wrong method, a failed CSRF check, a body over Django's size limit, the database unreachable
(503), an unhandled error. A client reads one error shape everywhere; only the admin, an HTML
console, keeps Django's pages."""

import sys

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import csrf, defaults

from gateway.api import ApiError

ADMIN_PREFIX = "/admin/"


def _for_a_client(request: HttpRequest) -> bool:
    return not request.path.startswith(ADMIN_PREFIX)


def _error(status: int, code: str, message: str, **detail: str) -> JsonResponse:
    return JsonResponse(ApiError(status, code, message, **detail).body(), status=status)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _for_a_client(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return _error(
            413, "too_large", "the body is over the size this service reads", field="body"
        )
    return _error(400, "bad_request", "the request could not be read")


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _for_a_client(request):
        return defaults.permission_denied(request, exception)
    return _error(403, "forbidden", "this request is not allowed")


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _for_a_client(request):
        return defaults.page_not_found(request, exception)
    return _error(404, "not_found", f"there is no endpoint at {request.path}")


def server_error(request: HttpRequest) -> HttpResponse:
    if not _for_a_client(request):
        return defaults.server_error(request)
    # Django calls this handler inside its `except` for the unhandled error, wherever it was
    # raised (a view, a decorator, a middleware), so the error is still the current one here.
    if isinstance(sys.exc_info()[1], OperationalError | InterfaceError):
        return _error(
            503,
            "unavailable",
            "the database is unavailable; retry with the same Idempotency-Key",
            dependency="database",
        )
    return _error(500, "internal", "an internal error; retry with the same Idempotency-Key")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    if not _for_a_client(request):
        return csrf.csrf_failure(request, reason)
    return _error(403, "forbidden", "this endpoint takes no browser form posts")


class MethodNotAllowedAsJson:
    """Django's 405 (from require_POST and its kind) has an empty body: the same refusal as our
    JSON error, its Allow header kept."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code != 405 or not _for_a_client(request):
            return response
        allowed = response.get("Allow", "")
        refusal = _error(
            405, "method_not_allowed", f"{request.method} is not allowed here (allowed: {allowed})"
        )
        refusal["Allow"] = allowed
        return refusal
