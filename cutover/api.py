"""The shell of the user-facing JSON API, shared by every app that serves it: bearer
authentication of API clients, correlation ids, JSON errors naming the field, and
`Idempotency-Key` handling (the first answer is stored and replayed)."""

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, JsonResponse

from cutover.exceptions import IdempotencyKeyInFlight, IdempotencyKeyReused
from cutover.models import ApiClient
from cutover.selectors import api_client_authenticate
from cutover.services import idempotency_claim, idempotency_complete, idempotency_release

log = logging.getLogger("cutover.api")
MAX_BODY_BYTES = 16 * 1024
MAX_KEY_LENGTH = 200


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"error": error}


class Unavailable(Exception):
    """Nothing was applied and the same key may be retried (kill switch, strict failure)."""


def api_view(view):
    """Correlation id, authentication and JSON errors around a view acting for one user:
    `view(request, client, user_id) -> (status, body)`."""

    def wrapper(request: HttpRequest, user_id: str):
        request.correlation_id = request.headers.get("X-Correlation-Id") or uuid.uuid4().hex
        try:
            owner = _user_id(user_id)
            client = _authenticate(request)
            if client.user_id and client.user_id != owner:
                raise ApiError(403, "forbidden", "this client may not act for that user")
            status, body = view(request, client, owner)
        except ApiError as exc:
            status, body = exc.status, exc.body()
        log.info(
            "%s %s -> %s correlation_id=%s",
            request.method,
            request.path,
            status,
            request.correlation_id,
        )
        response = JsonResponse(body, status=status)
        response["X-Correlation-Id"] = request.correlation_id
        return response

    wrapper.__name__ = view.__name__
    return wrapper


def _user_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "invalid", "user_id must be a UUID", "user_id") from None


def _authenticate(request: HttpRequest) -> ApiClient:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401, "unauthenticated", "send Authorization: Bearer <token>", "Authorization"
        )
    client = api_client_authenticate(token=token.strip())
    if client is None:
        raise ApiError(401, "unauthenticated", "unknown or inactive token", "Authorization")
    return client


def json_object(request: HttpRequest) -> dict:
    if len(request.body) > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return data


def request_fingerprint(user_id: uuid.UUID, parsed: dict) -> str:
    """What an Idempotency-Key is bound to: the user and the parsed request."""
    canonical = json.dumps({"user_id": str(user_id), **parsed}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotent(
    request: HttpRequest,
    client: ApiClient,
    user_id: uuid.UUID,
    parsed: dict,
    apply: Callable[[int], tuple[int, dict]],
) -> tuple[int, dict]:
    """Run `apply(record_id)` once per Idempotency-Key and remember its answer; a replay with
    the same request gets that answer, a different request under the same key a 422. When
    `apply` raises Unavailable nothing was applied: the key is released for a retry (503)."""
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ApiError(
            400,
            "invalid",
            f"Idempotency-Key is required (1..{MAX_KEY_LENGTH} characters)",
            "Idempotency-Key",
        )
    try:
        claim = idempotency_claim(
            client=client, key=key, request_sha256=request_fingerprint(user_id, parsed)
        )
    except IdempotencyKeyReused as exc:
        raise ApiError(422, "idempotency_key_reused", str(exc), "Idempotency-Key") from None
    except IdempotencyKeyInFlight as exc:
        raise ApiError(409, "idempotency_key_in_flight", str(exc), "Idempotency-Key") from None
    if claim.record is None:
        return claim.replay_status, claim.replay_body
    try:
        status, body = apply(claim.record.pk)
    except Unavailable as exc:
        idempotency_release(record=claim.record)
        raise ApiError(503, "unavailable", str(exc)) from None
        body = {**body, "idempotency_key": key}
    except ApiError as exc:
        status, body = exc.status, exc.body()
    idempotency_complete(record=claim.record, status=status, body=body)
    return status, body


def admin_token_refusal(request: HttpRequest) -> JsonResponse | None:
    """For the internal endpoints: None when the request carries `Authorization: Bearer
    <ADMIN_TOKEN>`; otherwise the 401 (no or malformed header) or 403 (another token) to send."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        error = ApiError(
            401, "unauthenticated", "send Authorization: Bearer <ADMIN_TOKEN>", "Authorization"
        )
    elif not settings.ADMIN_TOKEN or not hmac.compare_digest(token.strip(), settings.ADMIN_TOKEN):
        error = ApiError(403, "forbidden", "the token is not the admin token", "Authorization")
    else:
        return None
    return JsonResponse(error.body(), status=error.status)
