"""API clients and Idempotency-Keys: creating a client and its bearer token, claiming,
completing and releasing an Idempotency-Key, and counting a request against the client's
limits."""

import secrets
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from uuid import UUID, uuid4

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from gateway.exceptions import (
    ApiClientLimitExceeded,
    ApiClientRefused,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
)
from gateway.models import (
    ApiClient,
    ApiClientSpend,
    ApiScope,
    IdempotencyRecord,
    IdempotencyStatus,
    SpendDirection,
)
from gateway.selectors import token_digest

# Money out of a user's balance: debits and withdrawals share one rolling limit.
SPEND_DIRECTION = {
    ApiScope.CREDIT: SpendDirection.CREDIT,
    ApiScope.DEBIT: SpendDirection.DEBIT,
    ApiScope.WITHDRAW: SpendDirection.DEBIT,
}
SPEND_WINDOW = timedelta(hours=24)


def api_client_create(
    *,
    name: str,
    scopes: list[str],
    user_id: UUID | None = None,
    max_amount: Decimal | None = None,
    daily_limit: Decimal | None = None,
) -> tuple[ApiClient, str]:
    """A new API client and its bearer token (shown once; only its hash is stored). A client
    scoped to one user never gets `credit` or `addresses` (the database refuses them as well).
    The operator's audit is the caller's (cutover.operators.api_client_issue)."""
    unknown = sorted(set(scopes) - set(ApiScope.values))
    if unknown or not scopes:
        raise ApiClientRefused(
            f"scopes must be some of {', '.join(ApiScope.values)}, "
            f"got {', '.join(scopes) or 'none'}"
        )
    if user_id is not None and ApiScope.CREDIT in scopes:
        raise ApiClientRefused("a client scoped to one user may not credit balances")
    if user_id is not None and ApiScope.ADDRESSES in scopes:
        raise ApiClientRefused("a client scoped to one user may not register deposit addresses")
    for label, value in (("max amount", max_amount), ("daily limit", daily_limit)):
        if value is not None and value <= 0:
            raise ApiClientRefused(f"the {label} must be positive")
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        if ApiClient.objects.filter(name=name).exists():
            raise ApiClientRefused(f"a client named {name!r} already exists")
        client = ApiClient.objects.create(
            name=name,
            token_sha256=token_digest(token),
            user_id=user_id,
            scopes=sorted(set(scopes), key=ApiScope.values.index),
            max_amount=max_amount,
            daily_limit=daily_limit,
        )
    return client, token


@dataclass(frozen=True)
class IdempotencyClaim:
    record: IdempotencyRecord | None  # set: this request owns the key and must complete it
    replay_status: int | None = None
    replay_body: dict | None = None
    owner_token: UUID | None = None  # this claim's; completing or releasing needs it
    # Taken over from a request that stalled or died: that request may have applied the
    # mutation under the record's id (a crash after its commit).
    taken_over: bool = False


# Claim a key in one statement, whatever the others do to it meanwhile: PostgreSQL either
# inserts the row or locks the one that holds the key (ON CONFLICT DO UPDATE retries by itself
# when that row is deleted under it, e.g. released by a refused request), so a concurrent
# retry never finds the key both taken and gone. `inserted`: xmax is 0 only on a new row.
IDEMPOTENCY_CLAIM = f"""
    INSERT INTO {IdempotencyRecord._meta.db_table}
        (client_id, key, request_sha256, status, owner_token, locked_until, expires_at,
         created_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, now())
    ON CONFLICT (client_id, key) DO UPDATE SET key = EXCLUDED.key
    RETURNING id, (xmax = 0) AS inserted
"""


def idempotency_claim(*, client: ApiClient, key: str, request_sha256: str) -> IdempotencyClaim:
    """Claim `key` for this request in a short transaction of its own, so a concurrent duplicate
    sees it at once: a finished request is replayed, one in flight is refused (409), the same
    key with another request is refused (422). An expired key starts afresh; a claim whose
    holder died is taken over after IDEMPOTENCY_LOCK_TIMEOUT under a new owner token, so the
    stalled holder can no longer complete or release it (the journal reference keeps the
    mutation itself exactly-once). Race-free against concurrent claims, completions and
    releases of the same key (the row is inserted or locked in one statement)."""
    now = timezone.now()
    owner_token = uuid4()
    with transaction.atomic(durable=True):
        IdempotencyRecord.objects.filter(client=client, key=key, expires_at__lte=now).delete()
        with connection.cursor() as cursor:
            cursor.execute(
                IDEMPOTENCY_CLAIM,
                [
                    client.pk,
                    key,
                    request_sha256,
                    IdempotencyStatus.IN_FLIGHT,
                    owner_token,
                    now + settings.IDEMPOTENCY_LOCK_TIMEOUT,
                    now + settings.IDEMPOTENCY_KEY_TTL,
                ],
            )
            record_id, inserted = cursor.fetchone()
        record = IdempotencyRecord.objects.get(pk=record_id)  # locked by the claim until commit
        if inserted:
            return IdempotencyClaim(record, owner_token=owner_token)
        if record.request_sha256 != request_sha256:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with a different request; use a new key"
            )
        if record.status == IdempotencyStatus.COMPLETED:
            return IdempotencyClaim(None, record.response_status, record.response_body)
        if record.locked_until > now:
            raise IdempotencyKeyInFlight("a request with this Idempotency-Key is in flight")
        record.locked_until = now + settings.IDEMPOTENCY_LOCK_TIMEOUT
        record.owner_token = owner_token
        record.save(update_fields=["locked_until", "owner_token"])
        return IdempotencyClaim(record, owner_token=owner_token, taken_over=True)


def _owned(claim: IdempotencyClaim):
    return IdempotencyRecord.objects.filter(
        pk=claim.record.pk, owner_token=claim.owner_token, status=IdempotencyStatus.IN_FLIGHT
    )


def idempotency_complete(*, claim: IdempotencyClaim, status: int, body: dict) -> bool:
    """Store the answer, only while this claim still owns the record (False otherwise: a
    takeover's answer stands). A refused request (4xx) moved nothing: its spend is forgotten."""
    with transaction.atomic():
        done = _owned(claim).update(
            status=IdempotencyStatus.COMPLETED, response_status=status, response_body=body
        )
        if done and status >= 400:
            ApiClientSpend.objects.filter(idempotency_record=claim.record.pk).delete()
    return bool(done)


def idempotency_release(*, claim: IdempotencyClaim) -> bool:
    """Give back a claim whose request failed in a retryable way, only while this claim still
    owns the record (False otherwise). A key this request claimed first is forgotten with its
    spend: nothing was applied under it. A key it took over is kept, spend included, and left
    to the next retry at once: the request it took over may have applied the mutation, whose
    reference names the record's id. (Forgotten, its retry made a new record, a new reference
    and a second mutation: a debit applied twice under one key.)"""
    with transaction.atomic():
        owned = list(_owned(claim).select_for_update().values_list("pk", flat=True))
        if not owned:
            return False
        if claim.taken_over:
            IdempotencyRecord.objects.filter(pk__in=owned).update(
                locked_until=timezone.now(), owner_token=uuid4()
            )
            return True
        ApiClientSpend.objects.filter(idempotency_record__in=owned).delete()
        IdempotencyRecord.objects.filter(pk__in=owned).delete()
    return True


def api_client_spend(
    *, claim: IdempotencyClaim, scope: str, amount: Decimal, currency: str
) -> ApiClientSpend:
    """Count `amount` against the client's limits before the mutation runs: at most
    `max_amount` per operation and `daily_limit` per direction over the last 24 hours. Decided
    and recorded under a row lock on the client, so concurrent requests are counted one after
    the other; a takeover of the same key finds its spend already recorded."""
    direction = SPEND_DIRECTION[scope]
    with transaction.atomic():
        client = ApiClient.objects.select_for_update().get(pk=claim.record.client_id)
        if not _owned(claim).exists():
            raise IdempotencyKeyInFlight("this request no longer holds its Idempotency-Key")
        existing = ApiClientSpend.objects.filter(idempotency_record=claim.record.pk).first()
        if existing is not None:
            return existing
        if client.max_amount is not None and amount > client.max_amount:
            raise ApiClientLimitExceeded(
                f"{amount} is over this client's maximum of {client.max_amount} per operation",
                limit="max_amount",
            )
        if client.daily_limit is not None:
            spent = ApiClientSpend.objects.filter(
                client=client, direction=direction, at__gt=timezone.now() - SPEND_WINDOW
            ).aggregate(total=Sum("amount"))["total"] or Decimal(0)
            if spent + amount > client.daily_limit:
                raise ApiClientLimitExceeded(
                    f"{direction} of {amount} would take this client's last 24 h to "
                    f"{spent + amount}, over its daily limit of {client.daily_limit}",
                    limit="daily_limit",
                )
        return ApiClientSpend.objects.create(
            client=client,
            idempotency_record_id=claim.record.pk,
            direction=direction,
            amount=amount,
            currency=currency,
        )
