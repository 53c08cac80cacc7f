"""The floor of `bench webhooks`: what any subscriber of Circle's notifications must do and
nothing more — verify the signature over the raw body with the product's own check, store the
body — so the product's accepted/s reads as a share of it. Mounted only by the benchmark's
gunicorn (rehearsal.bench_urls), never in the product's URLs; its table is made by the
benchmark, not by a migration."""

import psycopg
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from gateway.api import ApiError
from onchain.exceptions import CircleUnavailable, SignatureRejected, UnknownSigningKey
from onchain.signatures import signature_verify

FLOOR_PATH = "/bench/floor"


def floor_table_create() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor_bodies (id bigserial PRIMARY KEY, "
            "body text NOT NULL, received_at timestamptz NOT NULL DEFAULT now())"
        )


def floor_bodies() -> list[str]:
    """Every body the floor stored, in arrival order."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT body FROM bench_floor_bodies ORDER BY id")
        return [body for (body,) in cursor.fetchall()]


def _refuse(status: int, code: str, message: str, field: str) -> JsonResponse:
    return JsonResponse(ApiError(status, code, message, field).body(), status=status)


@csrf_exempt
@require_POST
def floor_receive(request: HttpRequest) -> JsonResponse:
    try:
        signature_verify(
            body=request.body,
            signature=request.headers.get("X-Circle-Signature", ""),
            key_id=request.headers.get("X-Circle-Key-Id", ""),
            base_url=settings.CIRCLE_API_BASE_URL,
        )
    except SignatureRejected as exc:
        return _refuse(401, "bad_signature", str(exc), "X-Circle-Signature")
    except UnknownSigningKey as exc:
        return _refuse(400, "unknown_key", str(exc), "X-Circle-Key-Id")
    except CircleUnavailable as exc:  # the key could not be fetched: Circle retries
        return _refuse(503, "circle_unavailable", str(exc), "X-Circle-Key-Id")
    try:
        body = request.body.decode("utf-8")
    except UnicodeDecodeError:
        return _refuse(400, "malformed", "the body is not UTF-8", "body")
    if "\x00" in body:  # a text column refuses NUL
        return _refuse(400, "malformed", "the body contains a NUL character", "body")
    # As the product's deposit statement runs (cutover.balance_path.mutation_statement_run): on
    # psycopg's own cursor, prepared, without Django's per-request health check (a `SELECT 1`
    # round trip before the first query, which only the floor paid).
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute("INSERT INTO bench_floor_bodies (body) VALUES (%s)", [body], prepare=True)
    return JsonResponse({"stored": True})
