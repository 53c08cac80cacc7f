"""Circle's webhook (a thin view over onchain.inbox.notification_receive for Circle's v2
deliveries, onchain.sns.sns_receive for Circle Mint v1's through Amazon SNS), the buffer
status, and the API's withdrawals and deposit addresses."""

import logging
import uuid
from decimal import Decimal

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from cutover.actors import Actor
from cutover.exceptions import (
    CutoverError,
    KillSwitchEngaged,
    MutationConflict,
    StrictLedgerFailure,
)
from gateway.api import (
    PAUSED,
    UNAVAILABLE,
    ApiError,
    Refusal,
    admin_token_refusal,
    api_view,
    idempotent,
    json_object,
    scope_require,
)
from gateway.boundary import body_read, token_matches
from gateway.exceptions import InputRefused
from gateway.faults import fault_point
from gateway.models import ApiClient, ApiScope
from ledger.exceptions import InsufficientFunds, InvalidAmount, LedgerError
from ledger.money import amount_parse
from onchain import metrics
from onchain.addresses import DEPOSIT_CURRENCIES, deposit_address_add
from onchain.buffer_alert import buffer_status_observe
from onchain.chains import address_validate
from onchain.exceptions import (
    AddressInvalid,
    CircleUnavailable,
    DepositAddressRefused,
    DepositAddressTaken,
    MalformedNotification,
    SignatureRejected,
    SnsMalformed,
    SnsRejected,
    SnsUnavailable,
    UnknownSigningKey,
    WithdrawalRefused,
    WithdrawalTransitionRefused,
)
from onchain.inbox import Delivery, notification_receive
from onchain.models import DepositAddress, Withdrawal
from onchain.selectors import deposit_address_list
from onchain.sns import SnsSubscription, sns_receive
from onchain.withdrawals import withdrawal_request

log = logging.getLogger("onchain.webhook")


def _refuse(status: int, code: str, message: str, field: str | None = None) -> JsonResponse:
    metrics.webhook_received.labels(outcome=code).inc()
    log.warning("circle webhook refused: %s %s", code, message)
    return JsonResponse(ApiError(status, code, message, field).body(), status=status)


@csrf_exempt
@require_http_methods(["HEAD", "POST"])
def circle_transfers(request: HttpRequest) -> HttpResponse:
    if request.method == "HEAD":  # Circle checks the endpoint answers before subscribing it
        return HttpResponse(status=200)
    # CIRCLE_WEBHOOK_SECRET, when set, is a token in the subscriber URL registered with Circle
    # (`.../webhooks/circle/transfers?token=<secret>`), checked before anything else so that
    # strangers cannot make us fetch signing keys. It is an extra gate, never a substitute:
    # the signature is verified on every delivery either way.
    secret = settings.CIRCLE_WEBHOOK_SECRET
    if secret and not token_matches(request.GET.get("token", ""), secret):
        return _refuse(401, "bad_token", "the subscriber URL's token is missing or wrong", "token")
    try:
        body = body_read(request, limit=settings.CIRCLE_WEBHOOK_MAX_BYTES)
    except InputRefused as exc:
        return _refuse(exc.status, exc.code, str(exc), exc.field)
    if "x-amz-sns-message-type" in request.headers:  # Amazon SNS sends it on every delivery
        return _sns_transfers(body)
    try:
        delivery = notification_receive(
            body=body,
            signature=request.headers.get("X-Circle-Signature", ""),
            key_id=request.headers.get("X-Circle-Key-Id", ""),
        )
    except SignatureRejected as exc:
        return _refuse(401, "bad_signature", str(exc), "X-Circle-Signature")
    except UnknownSigningKey as exc:
        return _refuse(400, "unknown_key", str(exc), "X-Circle-Key-Id")
    except MalformedNotification as exc:
        return _refuse(400, "malformed", str(exc), exc.field)
    except CircleUnavailable as exc:
        return _refuse(503, "circle_unavailable", str(exc))
    # Stored, failed, retryable by a redelivery (a refused withdrawal transition included: the
    # row is evaluated afresh next time).
    except (CutoverError, LedgerError, WithdrawalTransitionRefused) as exc:
        return _refuse(503, "not_applied", str(exc))
    return _delivered(delivery)


def _sns_transfers(body: bytes) -> JsonResponse:
    """Circle Mint v1: an Amazon SNS delivery (its Content-Type, text/plain, is not read)."""
    try:
        received = sns_receive(body=body)
    except SnsMalformed as exc:
        return _refuse(400, "malformed", str(exc), exc.field)
    except SnsRejected as exc:
        return _refuse(403, "sns_rejected", str(exc), exc.field)
    except MalformedNotification as exc:
        return _refuse(400, "malformed", str(exc), "Message")
    except SnsUnavailable as exc:
        return _refuse(503, "sns_unavailable", str(exc))
    except (CutoverError, LedgerError, WithdrawalTransitionRefused) as exc:
        return _refuse(503, "not_applied", str(exc))
    if isinstance(received, SnsSubscription):
        return JsonResponse(
            {
                "messageId": received.message_id,
                "type": received.message_type,
                "topicArn": received.topic_arn,
                "duplicate": received.duplicate,
            }
        )
    return _delivered(received)


def _delivered(delivery: Delivery) -> JsonResponse:
    fault_point("webhook:circle-committed")
    return JsonResponse(
        {
            "notificationId": delivery.notification_id,
            "status": delivery.status,
            "duplicate": delivery.duplicate,
        }
    )


@csrf_exempt  # bearer ADMIN_TOKEN, never cookies: a wrong method is a 405, not a CSRF 403
@require_GET
def buffer_status_view(request: HttpRequest) -> JsonResponse:
    """Bearer ADMIN_TOKEN: the USDC buffer against its alert threshold."""
    refusal = admin_token_refusal(request)
    if refusal is not None:
        return refusal
    status = buffer_status_observe()
    return JsonResponse(
        {
            "currency": status.currency,
            "balance": str(status.balance.quantize(Decimal("0.000001"))),
            "alert_threshold": str(status.alert_threshold),
            "below_threshold": status.below_threshold,
        }
    )


def _withdrawal(withdrawal: Withdrawal) -> dict:
    return {
        "id": str(withdrawal.idempotency_key),
        "user_id": str(withdrawal.user_id),
        "amount": str(withdrawal.amount),
        "currency": withdrawal.currency,
        "address": withdrawal.address,
        "chain": withdrawal.chain,
        "status": withdrawal.status,
    }


# Withdrawal ids made from the API's idempotency record: a request re-run after a crash
# between the withdrawal's commit and its recorded answer finds the same withdrawal.
WITHDRAWAL_NAMESPACE = uuid.UUID("6f1d3c52-4b8e-4f0a-9a57-3c2b7e9d1a10")


# A withdrawal's refusals, as the API answers them.
WITHDRAWAL_REFUSALS = {
    KillSwitchEngaged: PAUSED,
    StrictLedgerFailure: UNAVAILABLE,
    InsufficientFunds: Refusal(422, "insufficient_funds", "amount"),
    MutationConflict: Refusal(422, "conflict"),
    WithdrawalRefused: Refusal(422, "conflict"),
}


def _withdrawal_request(request: HttpRequest, client: ApiClient) -> dict:
    scope_require(client, ApiScope.WITHDRAW)
    data = json_object(request)
    for field in ("amount", "address", "chain"):
        if not isinstance(data.get(field), str):
            raise ApiError(400, "invalid", f"{field} must be a string", field)
    try:
        amount = amount_parse(data["amount"], "USDC")
    except InvalidAmount as exc:
        raise ApiError(400, "invalid", str(exc), "amount") from None
    address, chain = data["address"].strip(), data["chain"]
    try:
        address_validate(chain=chain, address=address)
    except AddressInvalid as exc:
        raise ApiError(400, "invalid", str(exc), exc.field) from None
    return {"amount": amount, "address": address, "chain": chain}


@csrf_exempt
@require_POST
@api_view
@idempotent(
    parse=_withdrawal_request,
    spend=lambda withdrawal: (ApiScope.WITHDRAW, withdrawal["amount"], "USDC"),
    refusals=WITHDRAWAL_REFUSALS,
)
def withdrawal_create(
    request: HttpRequest, client: ApiClient, user_id: uuid.UUID, parsed: dict, record_id: int
):
    """A user's USDC withdrawal: held now, sent to Circle by the outbox worker."""
    withdrawal = withdrawal_request(
        user_id=user_id,
        idempotency_key=uuid.uuid5(WITHDRAWAL_NAMESPACE, f"api:{record_id}"),
        requested_by=client.name,
        correlation_id=request.correlation_id,
        **parsed,
    )
    return 201, _withdrawal(withdrawal)


def _deposit_address(row: DepositAddress) -> dict:
    return {
        "address": row.address,
        "chain": row.chain,
        "user_id": str(row.user_id),
        "currency": row.currency,
        "created_at": row.created_at.isoformat(),
    }


# A registration's refusals, as the API answers them (its invalid fields are 400s at parsing).
DEPOSIT_ADDRESS_REFUSALS = {
    DepositAddressTaken: Refusal(409, "address_taken", "address"),
    DepositAddressRefused: Refusal(422, "currency_mismatch", "currency"),
}


def _deposit_address_request(request: HttpRequest, client: ApiClient) -> dict:
    scope_require(client, ApiScope.ADDRESSES)
    data = json_object(request)
    currency = data.get("currency", "USDC")
    try:
        # Validated here, so a bad field is a 400 before the Idempotency-Key is claimed.
        address = address_validate(chain=data.get("chain"), address=data.get("address"))
        if currency not in DEPOSIT_CURRENCIES:
            raise AddressInvalid(
                "currency", f"currency must be one of {', '.join(DEPOSIT_CURRENCIES)}"
            )
    except AddressInvalid as exc:
        raise ApiError(400, "invalid", str(exc), exc.field) from None
    return {"address": address, "chain": data["chain"], "currency": currency}


@api_view
@idempotent(parse=_deposit_address_request, spend=None, refusals=DEPOSIT_ADDRESS_REFUSALS)
def _deposit_address_create(
    request: HttpRequest, client: ApiClient, user_id: uuid.UUID, parsed: dict, record_id: int
):
    """Register a deposit address for the user (a service client with the `addresses` scope):
    201 when registered, 200 when it already was; its parked deposits are credited."""
    added = deposit_address_add(
        user_id=user_id,
        actor=Actor(name=f"api:{client.name}"),
        reason=f"API request {request.correlation_id}",
        **parsed,
    )
    body = {**_deposit_address(added.address), "replayed": added.replayed}
    return (201 if added.created else 200), body


@api_view
def _deposit_addresses_list(request: HttpRequest, client: ApiClient, user_id: uuid.UUID):
    """The user's deposit addresses, for a client that may read or register them."""
    if ApiScope.READ not in client.scopes:
        scope_require(client, ApiScope.ADDRESSES)
    rows = deposit_address_list(user_id=user_id)
    return 200, {"deposit_addresses": [_deposit_address(row) for row in rows]}


@csrf_exempt
@require_http_methods(["GET", "POST"])
def deposit_addresses(request: HttpRequest, user_id: str):
    if request.method == "POST":
        return _deposit_address_create(request, user_id)
    return _deposit_addresses_list(request, user_id)
