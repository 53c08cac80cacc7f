"""The HTTP edge's state: the API clients (bearer tokens, scopes, limits), what each client's
requests moved within its rolling limit, and the Idempotency-Keys with their stored answers.
The tables keep the names they had in the cutover app, which served the API first.

What PostgreSQL holds: a client's scopes are known ones, a client scoped to one user never
holds `credit` or `addresses`, limits are positive when set; spends are positive; one record
per client and Idempotency-Key, with a legal status.
"""

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q
from django.db.models.functions import Now


class ApiScope(models.TextChoices):
    READ = "read", "Read balances"
    CREDIT = "credit", "Credit balances"
    DEBIT = "debit", "Debit balances"
    WITHDRAW = "withdraw", "Withdraw on chain"
    # Registering a deposit address credits its parked deposits to the user named: never a
    # user's own client's to hold (the database refuses it, as it refuses `credit`).
    ADDRESSES = "addresses", "Register deposit addresses"


class SpendDirection(models.TextChoices):
    """Money into (credit) or out of (debit) a user's balance, as a client's limits count it."""

    CREDIT = "credit", "Credit"
    DEBIT = "debit", "Debit"


class ApiClient(models.Model):
    """A caller of the balance API. `user_id` set: the client may only read and move that
    user's balance, and never credit it nor register deposit addresses (the database refuses
    those scopes); empty: a service client for any user. `scopes` say which operations it may
    call; `max_amount` caps one operation and `daily_limit` the rolling 24 h total of each
    direction (money in: credits; money out: debits and withdrawals); empty means no cap. Only
    the token's hash is stored."""

    name = models.CharField(max_length=100, unique=True)
    token_sha256 = models.CharField(max_length=64, unique=True)
    user_id = models.UUIDField(null=True, blank=True)
    scopes = ArrayField(models.CharField(max_length=16, choices=ApiScope.choices), default=list)
    max_amount = models.DecimalField(max_digits=38, decimal_places=6, null=True, blank=True)
    daily_limit = models.DecimalField(max_digits=38, decimal_places=6, null=True, blank=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "cutover_api_clients"
        constraints = [
            models.CheckConstraint(
                condition=Q(scopes__contained_by=ApiScope.values),
                name="cutover_api_clients_chk_scopes",
            ),
            models.CheckConstraint(
                condition=Q(user_id__isnull=True) | ~Q(scopes__contains=[ApiScope.CREDIT]),
                name="cutover_api_clients_chk_user_never_credits",
            ),
            models.CheckConstraint(
                condition=Q(user_id__isnull=True) | ~Q(scopes__contains=[ApiScope.ADDRESSES]),
                name="cutover_api_clients_chk_user_never_addresses",
            ),
            models.CheckConstraint(
                condition=Q(max_amount__isnull=True) | Q(max_amount__gt=0),
                name="cutover_api_clients_chk_max_amount",
            ),
            models.CheckConstraint(
                condition=Q(daily_limit__isnull=True) | Q(daily_limit__gt=0),
                name="cutover_api_clients_chk_daily_limit",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class ApiClientSpend(models.Model):
    """What a client's request moved (or is moving), counted against its rolling 24 h limit.
    Recorded under a row lock on the client before the mutation runs, so two concurrent
    requests cannot both fit under the limit; removed again when the mutation was not applied."""

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE)
    idempotency_record = models.OneToOneField(
        "IdempotencyRecord", null=True, on_delete=models.SET_NULL
    )
    direction = models.CharField(max_length=6, choices=SpendDirection.choices)
    amount = models.DecimalField(max_digits=38, decimal_places=6)
    currency = models.CharField(max_length=8)
    at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "cutover_api_client_spend"
        indexes = [models.Index(fields=["client", "direction", "at"], name="cutover_spend_window")]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="cutover_spend_chk_amount"),
        ]

    def __str__(self) -> str:
        return f"{self.client_id} {self.direction} {self.amount} {self.currency}"


class IdempotencyStatus(models.TextChoices):
    IN_FLIGHT = "in_flight", "In flight"
    COMPLETED = "completed", "Completed"


class IdempotencyRecord(models.Model):
    """One Idempotency-Key of one client: the request's hash and, once done, its response."""

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE)
    key = models.CharField(max_length=255)
    request_sha256 = models.CharField(max_length=64)
    status = models.CharField(max_length=12, choices=IdempotencyStatus.choices)
    response_status = models.PositiveSmallIntegerField(null=True)
    response_body = models.JSONField(null=True)
    locked_until = models.DateTimeField()
    # Who holds the claim: a new token for each claim and takeover; only its holder may
    # complete or release the record (conditional UPDATE/DELETE).
    owner_token = models.UUIDField(null=True)
    expires_at = models.DateTimeField(db_index=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "cutover_idempotency_keys"
        constraints = [
            models.UniqueConstraint(fields=["client", "key"], name="cutover_idempotency_uniq_key"),
            models.CheckConstraint(
                condition=Q(status__in=IdempotencyStatus.values),
                name="cutover_idempotency_chk_status",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.client_id}:{self.key}"
