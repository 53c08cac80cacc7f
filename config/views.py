"""Process probes, and the API's OpenAPI document. /healthz says the process is alive; /readyz
that the dependencies a web process serves requests with answer. That is the database only: the
web never enqueues a task (the beat does), so a broker outage must not take the API out of the
Service."""

from pathlib import Path

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET


def _database_check() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return "ok"


def _failure(exc: Exception) -> str:
    # The first line of the driver's message says what failed (refused, timed out, bad password).
    lines = str(exc).strip().splitlines()
    return f"error: {exc.__class__.__name__}" + (f": {lines[0]}" if lines else "")


# Probes act on nothing: a wrong method is a 405, never a CSRF 403.
@csrf_exempt
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@csrf_exempt
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    try:
        checks = {"database": _database_check()}
    except Exception as exc:  # a probe reports any failure instead of raising it
        checks = {"database": _failure(exc)}
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
    )


# The API's OpenAPI document, kept in the repository beside the URLs it describes (checked
# against them by tests/test_openapi.py) and served as it is.
OPENAPI_DOCUMENT = (Path(__file__).resolve().parent / "openapi.json").read_bytes()


@csrf_exempt
@require_GET
def openapi(request: HttpRequest) -> HttpResponse:
    return HttpResponse(OPENAPI_DOCUMENT, content_type="application/json")
