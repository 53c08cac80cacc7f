"""The balance API: thin views over the balance path. Errors are JSON naming the field."""

import hashlib
import json
import logging
import uuid
from decimal import Decimal

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from cutover.exceptions import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    KillSwitchEngaged,
    MutationConflict,
    StrictLedgerFailure,
)
from cutover.models import ApiClient, Direction
from cutover.selectors import api_client_authenticate, balance_get
from cutover.services import (
    balance_mutate,
    idempotency_claim,
    idempotency_complete,
    idempotency_release,
)
from ledger.exceptions import InsufficientFunds, InvalidAmount
from ledger.money import CURRENCY_DECIMALS, amount_parse

log = logging.getLogger("cutover.api")
MAX_BODY_BYTES = 16 * 1024
MAX_KEY_LENGTH = 200
MAX_REASON_LENGTH = 64


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"error": error}


def _respond(request: HttpRequest, status: int, body: dict) -> JsonResponse:
    response = JsonResponse(body, status=status)
    response["X-Correlation-Id"] = request.correlation_id
    return response


def _api_view(view):
    """Correlation id, authentication and JSON errors around a balance API view."""

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
        return _respond(request, status, body)

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


def _reading(reading) -> dict:
    return {
        "user_id": str(reading.user_id),
        "currency": reading.currency,
        "balance": str(
            reading.amount.quantize(Decimal(1).scaleb(-CURRENCY_DECIMALS[reading.currency]))
        ),
        "source": reading.source,
        "phase": reading.phase,
    }


@require_GET
@_api_view
def balance_detail(request: HttpRequest, client: ApiClient, user_id: uuid.UUID):
    currency = request.GET.get("currency", "USDC")
    if currency not in CURRENCY_DECIMALS:
        raise ApiError(400, "invalid", f"unknown currency {currency!r}", "currency")
    return 200, _reading(balance_get(user_id=user_id, currency=currency))


def _mutation_request(request: HttpRequest) -> dict:
    if len(request.body) > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    direction = data.get("direction")
    if direction not in Direction.values:
        raise ApiError(400, "invalid", "direction must be credit or debit", "direction")
    currency = data.get("currency", "USDC")
    if currency not in CURRENCY_DECIMALS:
        raise ApiError(400, "invalid", f"unknown currency {currency!r}", "currency")
    if not isinstance(data.get("amount"), str):
        raise ApiError(400, "invalid", 'amount must be a decimal string such as "10.50"', "amount")
    try:
        amount = amount_parse(data["amount"], currency)
    except InvalidAmount as exc:
        raise ApiError(400, "invalid", str(exc), "amount") from None
    reason = data.get("reason", "api")
    if not isinstance(reason, str) or not reason or len(reason) > MAX_REASON_LENGTH:
        raise ApiError(
            400, "invalid", f"reason must be 1..{MAX_REASON_LENGTH} characters", "reason"
        )
    return {"direction": direction, "amount": amount, "currency": currency, "reason": reason}


def request_fingerprint(user_id: uuid.UUID, mutation: dict) -> str:
    """What an Idempotency-Key is bound to: the user and the parsed mutation."""
    canonical = json.dumps({"user_id": str(user_id), **mutation}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@csrf_exempt
@require_POST
@_api_view
def balance_mutation_create(request: HttpRequest, client: ApiClient, user_id: uuid.UUID):
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ApiError(
            400,
            "invalid",
            f"Idempotency-Key is required (1..{MAX_KEY_LENGTH} characters)",
            "Idempotency-Key",
        )
    mutation = _mutation_request(request)
    try:
        claim = idempotency_claim(
            client=client, key=key, request_sha256=request_fingerprint(user_id, mutation)
        )
    except IdempotencyKeyReused as exc:
        raise ApiError(422, "idempotency_key_reused", str(exc), "Idempotency-Key") from None
    except IdempotencyKeyInFlight as exc:
        raise ApiError(409, "idempotency_key_in_flight", str(exc), "Idempotency-Key") from None
    if claim.record is None:
        return claim.replay_status, claim.replay_body
    try:
        result = balance_mutate(
            user_id=user_id,
            reference=f"api:{claim.record.pk}",
            correlation_id=request.correlation_id,
            **mutation,
        )
    except (KillSwitchEngaged, StrictLedgerFailure) as exc:
        idempotency_release(record=claim.record)  # nothing applied: the client may retry
        raise ApiError(503, "unavailable", str(exc)) from None
    except InsufficientFunds as exc:
        status, body = 422, ApiError(422, "insufficient_funds", str(exc), "amount").body()
    except MutationConflict as exc:
        status, body = 422, ApiError(422, "conflict", str(exc)).body()
    else:
        status, body = (
            201,
            {
                "user_id": str(result.user_id),
                "direction": result.direction,
                "amount": str(result.amount),
                "currency": result.currency,
                "phase": result.phase,
                "balance": _reading(balance_get(user_id=user_id, currency=result.currency))[
                    "balance"
                ],
                "idempotency_key": key,
            },
        )
    idempotency_complete(record=claim.record, status=status, body=body)
    return status, body
