"""The balance API: thin views over the balance path. Errors are JSON naming the field."""

import uuid
from decimal import Decimal

from django.http import HttpRequest
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from cutover.balance_path import balance_mutate
from cutover.exceptions import (
    CurrencyNotHeld,
    KillSwitchEngaged,
    MutationConflict,
    StrictLedgerFailure,
)
from cutover.models import Direction
from cutover.selectors import balance_get
from gateway.api import (
    PAUSED,
    UNAVAILABLE,
    ApiError,
    Refusal,
    api_view,
    idempotent,
    json_object,
    scope_require,
)
from gateway.faults import fault_point
from gateway.models import ApiClient, ApiScope
from ledger.exceptions import InsufficientFunds, InvalidAmount
from ledger.money import CURRENCY_DECIMALS, amount_parse

MAX_REASON_LENGTH = 64
# The balance path's refusals, as the API answers them.
REFUSALS = {
    KillSwitchEngaged: PAUSED,
    StrictLedgerFailure: UNAVAILABLE,
    InsufficientFunds: Refusal(422, "insufficient_funds", "amount"),
    MutationConflict: Refusal(422, "conflict"),
}


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
@api_view
def balance_detail(request: HttpRequest, client: ApiClient, user_id: uuid.UUID):
    scope_require(client, ApiScope.READ)
    currency = request.GET.get("currency", "USDC")
    if currency not in CURRENCY_DECIMALS:
        raise ApiError(400, "invalid", f"unknown currency {currency!r}", "currency")
    try:
        return 200, _reading(balance_get(user_id=user_id, currency=currency))
    except CurrencyNotHeld as exc:
        message = f"{exc}: ask for ?currency=<the one held>"
        raise ApiError(422, "conflict", message, "currency") from None


def _mutation_request(request: HttpRequest, client: ApiClient) -> dict:
    data = json_object(request)
    direction = data.get("direction")
    if direction not in Direction.values:
        raise ApiError(400, "invalid", "direction must be credit or debit", "direction")
    currency = data.get("currency", "USDC")
    if not isinstance(currency, str) or currency not in CURRENCY_DECIMALS:
        raise ApiError(400, "invalid", f"unknown currency {currency!r}", "currency")
    if not isinstance(data.get("amount"), str):
        raise ApiError(400, "invalid", 'amount must be a decimal string such as "10.50"', "amount")
    try:
        amount = amount_parse(data["amount"], currency)
    except InvalidAmount as exc:
        raise ApiError(400, "invalid", str(exc), "amount") from None
    reason = data.get("reason", "api")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_LENGTH:
        message = f"reason must be 1..{MAX_REASON_LENGTH} characters, not only spaces"
        raise ApiError(400, "invalid", message, "reason")
    scope_require(client, direction)  # the credit and debit scopes
    return {"direction": direction, "amount": amount, "currency": currency, "reason": reason}


@csrf_exempt
@require_POST
@api_view
@idempotent(
    parse=_mutation_request,
    spend=lambda mutation: (mutation["direction"], mutation["amount"], mutation["currency"]),
    refusals=REFUSALS,
)
def balance_mutation_create(
    request: HttpRequest, client: ApiClient, user_id: uuid.UUID, mutation: dict, record_id: int
):
    result = balance_mutate(
        user_id=user_id,
        reference=f"api:{record_id}",
        correlation_id=request.correlation_id,
        **mutation,
    )
    fault_point("api:mutation-applied")
    return 201, {
        "user_id": str(result.user_id),
        "direction": result.direction,
        "amount": str(result.amount),
        "currency": result.currency,
        "phase": result.phase,
        "balance": _reading(balance_get(user_id=user_id, currency=result.currency))["balance"],
    }
