"""The shell of the user-facing JSON API, shared by every app that serves it: bearer
authentication of API clients and their scopes, correlation ids, JSON errors naming the field,
and `Idempotency-Key` handling (the first answer is stored and replayed)."""

import functools
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from gateway import boundary
from gateway.boundary import bearer_token, printable_ascii, token_matches
from gateway.exceptions import (
    ApiClientLimitExceeded,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InputRefused,
)
from gateway.log_context import log_context, log_context_bind, log_context_current
from gateway.models import ApiClient
from gateway.selectors import api_client_authenticate
from gateway.services import (
    IdempotencyClaim,
    api_client_spend,
    idempotency_claim,
    idempotency_complete,
    idempotency_release,
)

log = logging.getLogger("gateway.api")
MAX_BODY_BYTES = 16 * 1024
MAX_KEY_LENGTH = 200
MAX_CORRELATION_ID_LENGTH = 128  # the journal's and the withdrawals' column


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, **detail: str
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.detail = detail  # more names for the client: the missing scope, the limit

    def body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"error": {**error, **self.detail}}


@dataclass(frozen=True)
class Refusal:
    """How a service's domain exception is answered: an ApiError with the exception's message,
    stored and replayed under its Idempotency-Key; a retryable one (nothing was applied: kill
    switch, strict failure) releases the key instead, so the same key may be retried."""

    status: int
    code: str
    field: str | None = None
    retryable: bool = False
    message: str | None = None  # said instead of the exception's, which is for operators

    def error(self, exc: Exception) -> ApiError:
        # (an exception that knows which of the caller's fields it is about names it)
        field = self.field or getattr(exc, "field", None)
        return ApiError(self.status, self.code, self.message or str(exc), field)


# The kill switch's reason and a strict failure's cause are the operators' (an incident, a
# user's id, the ledger's error): found from outside, the reason reached every API client,
# user-scoped ones included. The client hears what it can act on; the logs keep the rest.
PAUSED = Refusal(
    503,
    "unavailable",
    retryable=True,
    message="money movements are paused (kill switch engaged); nothing was applied, retry later",
)
UNAVAILABLE = Refusal(
    503,
    "unavailable",
    retryable=True,
    message="the ledger could not apply this now; nothing was applied, retry later",
)


def _refusal(exc: Exception, refusals: Mapping[type[Exception], Refusal]) -> Refusal | None:
    """The refusal of the most specific class of `exc` that `refusals` names, if any."""
    return next((refusals[cls] for cls in type(exc).__mro__ if cls in refusals), None)


class CorrelationIdMiddleware:
    """Every request's correlation id: the caller's X-Correlation-Id when it is one we can
    carry (api_view refuses a bad one with 400), else a new one. It is on every log line of the
    request (with the admin user, once authenticated) and echoed on the response."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        raw = request.headers.get("X-Correlation-Id")
        request.correlation_id = raw if _correlation_id_valid(raw) else uuid.uuid4().hex
        with log_context(correlation_id=request.correlation_id):
            response = self.get_response(request)
            request.log_context = log_context_current()  # for what Django logs after us
        response["X-Correlation-Id"] = request.correlation_id
        return response

    def process_view(self, request: HttpRequest, view, args, kwargs) -> None:
        # Runs after AuthenticationMiddleware: the admin's user is known (named as
        # cutover.actors.Actor.for_user names it). A request without a session cookie costs
        # no query here.
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            log_context_bind(actor=f"admin:{user.get_username()}")


def api_view(view):
    """Authentication, the X-Correlation-Id check and JSON errors around a view acting for one
    user: `view(request, client, user_id) -> (status, body)`."""

    def wrapper(request: HttpRequest, user_id: str):
        try:
            _correlation_id_check(request)
            owner = _user_id(user_id)
            client = _authenticate(request)
            log_context_bind(actor=f"api:{client.name}")
            if client.user_id and client.user_id != owner:
                raise ApiError(403, "forbidden", "this client may not act for that user")
            status, body = view(request, client, owner)
        except ApiError as exc:
            status, body = exc.status, exc.body()
        log.info("%s %s -> %s", request.method, request.path, status, extra={"status_code": status})
        return JsonResponse(body, status=status)

    wrapper.__name__ = view.__name__
    # Bearer tokens, never cookies: a browser's form cannot act with them, so a CSRF check has
    # nothing to protect and would answer a wrong method with 403 instead of 405.
    wrapper.csrf_exempt = True
    return wrapper


def _user_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "invalid", "user_id must be a UUID", "user_id") from None


def _correlation_id_valid(raw: str | None) -> bool:
    """Printable ASCII that fits the journal's column."""
    return bool(raw) and printable_ascii(raw, max_length=MAX_CORRELATION_ID_LENGTH)


def _correlation_id_check(request: HttpRequest) -> None:
    """A bad X-Correlation-Id is refused before anything is claimed or written (the answer
    carries the new one CorrelationIdMiddleware gave the request)."""
    raw = request.headers.get("X-Correlation-Id")
    if raw and not _correlation_id_valid(raw):
        raise ApiError(
            400,
            "invalid",
            f"X-Correlation-Id must be 1..{MAX_CORRELATION_ID_LENGTH} printable ASCII "
            "characters without spaces",
            "X-Correlation-Id",
        )


def _authenticate(request: HttpRequest) -> ApiClient:
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401, "unauthenticated", "send Authorization: Bearer <token>", "Authorization"
        )
    client = api_client_authenticate(token=token)
    if client is None:
        raise ApiError(401, "unauthenticated", "unknown or inactive token", "Authorization")
    return client


def scope_require(client: ApiClient, scope: str) -> None:
    """403 naming the scope when the client was not given it."""
    if scope not in client.scopes:
        raise ApiError(
            403,
            "missing_scope",
            f"this client lacks the {scope!r} scope",
            "Authorization",
            scope=scope,
        )


def json_object(request: HttpRequest) -> dict:
    """The request's JSON object, through the input boundary (size, depth, encoding, storable
    text): its refusal is a 4xx naming the field, before any key is claimed or written."""
    try:
        return boundary.json_object(boundary.body_read(request, limit=MAX_BODY_BYTES))
    except InputRefused as exc:
        raise ApiError(exc.status, exc.code, str(exc), exc.field) from None


def request_fingerprint(user_id: uuid.UUID, parsed: dict) -> str:
    """What an Idempotency-Key is bound to: the user and the parsed request."""
    canonical = json.dumps({"user_id": str(user_id), **parsed}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _in_flight(exc: IdempotencyKeyInFlight) -> ApiError:
    return ApiError(409, "idempotency_key_in_flight", str(exc), "Idempotency-Key")


def _claim(
    request: HttpRequest,
    client: ApiClient,
    user_id: uuid.UUID,
    parsed: dict,
    spend: tuple[str, Decimal, str] | None,
) -> IdempotencyClaim:
    """This request's claim of its Idempotency-Key (a replay when the key has its answer), its
    `spend` (if it moves money) counted against the client's limits."""
    key = request.headers.get("Idempotency-Key", "").strip(" \t")
    if not printable_ascii(key, max_length=MAX_KEY_LENGTH):
        raise ApiError(
            400,
            "invalid",
            f"Idempotency-Key is required: 1..{MAX_KEY_LENGTH} printable ASCII characters "
            "without spaces",
            "Idempotency-Key",
        )
    try:
        claim = idempotency_claim(
            client=client, key=key, request_sha256=request_fingerprint(user_id, parsed)
        )
    except IdempotencyKeyReused as exc:
        raise ApiError(422, "idempotency_key_reused", str(exc), "Idempotency-Key") from None
    except IdempotencyKeyInFlight as exc:
        raise _in_flight(exc) from None
    if claim.record is None or spend is None:
        return claim
    scope, amount, currency = spend
    try:
        api_client_spend(claim=claim, scope=scope, amount=amount, currency=currency)
    except ApiClientLimitExceeded as exc:
        idempotency_release(claim=claim)
        status = 429 if exc.limit == "daily_limit" else 422
        raise ApiError(status, "limit_exceeded", str(exc), "amount", limit=exc.limit) from None
    except IdempotencyKeyInFlight as exc:
        raise _in_flight(exc) from None
    return claim


def idempotent(
    *,
    parse: Callable[[HttpRequest, ApiClient], dict],
    spend: Callable[[dict], tuple[str, Decimal, str]] | None,
    refusals: Mapping[type[Exception], Refusal],
):
    """A view run once per Idempotency-Key, its answer remembered: under `api_view`, the
    decorated `view(request, client, user_id, parsed, record_id) -> (status, body)` calls one
    service with what `parse(request, client)` made of the request (its errors and scope checks
    come first) and the key's record id (a reference that stays the same across a takeover).

    A replay with the same request gets the first answer, a different request under the same
    key a 422, one still in flight a 409. Before the view, `spend(parsed)` (scope, amount,
    currency; `spend=None` for a request that moves no money) is counted against the client's
    limits: over one is 422 (per operation) or 429
    (daily), nothing applied and the key released for a retry. The service's exceptions named
    in `refusals` are answered as they say (a retryable one 503 with the key released). Only
    the claim's owner completes or releases the key: a request that stalled past
    IDEMPOTENCY_LOCK_TIMEOUT and was taken over changes nothing."""

    def decorate(view):
        @functools.wraps(view)
        def wrapper(request: HttpRequest, client: ApiClient, user_id: uuid.UUID):
            parsed = parse(request, client)
            claim = _claim(request, client, user_id, parsed, spend and spend(parsed))
            if claim.record is None:
                return claim.replay_status, claim.replay_body
            try:
                status, body = view(request, client, user_id, parsed, claim.record.pk)
            except Exception as exc:
                refusal = _refusal(exc, refusals)
                if refusal is None:
                    raise
                if refusal.message:  # the client hears less: the operators read why here
                    log.warning(
                        "%s %s refused (%s): %s", request.method, request.path, refusal.code, exc
                    )
                if refusal.retryable:
                    idempotency_release(claim=claim)
                    raise refusal.error(exc) from None
                status, body = refusal.status, refusal.error(exc).body()
            if not idempotency_complete(claim=claim, status=status, body=body):
                log.warning(
                    "Idempotency-Key %r was taken over while this request ran; its answer stands",
                    claim.record.key,
                )
            return status, body

        return wrapper

    return decorate


def admin_token_refusal(request: HttpRequest) -> JsonResponse | None:
    """For the internal endpoints: None when the request carries `Authorization: Bearer
    <ADMIN_TOKEN>`; otherwise the 401 (no, malformed or another token) to send."""
    token = bearer_token(request)
    if token is None:
        error = ApiError(
            401, "unauthenticated", "send Authorization: Bearer <ADMIN_TOKEN>", "Authorization"
        )
    elif not token_matches(token, settings.ADMIN_TOKEN):
        error = ApiError(403, "forbidden", "the token is not the admin token", "Authorization")
    else:
        return None
    return JsonResponse(error.body(), status=error.status)
