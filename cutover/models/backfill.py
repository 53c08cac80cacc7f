"""Backfill runs, their user ranges and the postings they made (once per state of an account)."""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now


class BackfillRun(models.Model):
    """A backfill's pass over the legacy users, split into disjoint user_id ranges
    (BackfillRange) that workers take in parallel, each with its own durable checkpoint. The
    run is finished, with its ranges' sums, once every range is. (`position` was the run's one
    checkpoint before ranges, cutover migration 0019; a run made then gets ranges when resumed.)"""

    started_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    position = models.UUIDField(null=True, blank=True)  # None: before the first user
    chunks = models.BigIntegerField(db_default=0)
    users_examined = models.BigIntegerField(db_default=0)
    postings = models.BigIntegerField(db_default=0)
    amount = models.DecimalField(max_digits=38, decimal_places=6, db_default=0)

    class Meta:
        db_table = "cutover_backfill_runs"
        constraints = [
            models.UniqueConstraint(
                fields=["finished_at"],
                condition=Q(finished_at__isnull=True),
                nulls_distinct=False,
                name="cutover_backfill_runs_uniq_unfinished",
            ),
        ]

    def __str__(self) -> str:
        state = f"finished {self.finished_at:%Y-%m-%d %H:%M}" if self.finished_at else "running"
        return f"backfill run {self.pk}: {self.users_examined} users, {state}"


class BackfillRange(models.Model):
    """One of a backfill run's user ranges, `low` <= user_id < `high` (NULL: unbounded), and its
    durable checkpoint: `position` (the last user it has covered) and its counts move with each
    chunk, in the chunk's transaction (cutover_backfill_range_chunk), under the range's row
    lock: a worker takes a range with SELECT ... FOR UPDATE SKIP LOCKED for one chunk, so
    several workers work different ranges at once, and a worker killed mid-chunk leaves the
    range at its last committed checkpoint for the next taker. `seq` also picks the
    opening-balance equity shard its chunks post against (seq modulo 64)."""

    run = models.ForeignKey(BackfillRun, on_delete=models.CASCADE, related_name="ranges")
    seq = models.IntegerField()
    low = models.UUIDField(null=True, blank=True)
    high = models.UUIDField(null=True, blank=True)
    position = models.UUIDField(null=True, blank=True)  # None: before the range's first user
    updated_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    chunks = models.BigIntegerField(db_default=0)
    users_examined = models.BigIntegerField(db_default=0)
    postings = models.BigIntegerField(db_default=0)
    amount = models.DecimalField(max_digits=38, decimal_places=6, db_default=0)

    class Meta:
        db_table = "cutover_backfill_ranges"
        constraints = [
            models.UniqueConstraint(fields=["run", "seq"], name="cutover_backfill_ranges_uniq_seq"),
            models.CheckConstraint(
                condition=Q(low__isnull=True) | Q(high__isnull=True) | Q(low__lt=models.F("high")),
                name="cutover_backfill_ranges_chk_range",
            ),
        ]

    def __str__(self) -> str:
        return f"backfill run {self.run_id} range {self.seq}: {self.users_examined} users"


class BackfillPosting(models.Model):
    """One user's backfill posting: the difference (legacy - ledger) found under the user's
    locks, posted in its chunk's ledger transaction. Unique per state of the user's account
    (its entry count when the difference was computed), so the database refuses a second
    posting computed from the same state: no user is ever posted twice for one difference."""

    run_id = models.BigIntegerField()  # its BackfillRun
    user_id = models.UUIDField()
    currency = models.CharField(max_length=8)
    entries_before = models.BigIntegerField()
    legacy_balance = models.DecimalField(max_digits=38, decimal_places=6)
    amount = models.DecimalField(max_digits=38, decimal_places=6)  # signed: to the user
    ledger_transaction_id = models.BigIntegerField()

    class Meta:
        db_table = "cutover_backfill_postings"
        constraints = [
            models.UniqueConstraint(
                fields=["user_id", "entries_before"],
                name="cutover_backfill_postings_uniq_user_state",
            ),
            models.CheckConstraint(
                condition=~Q(amount=0), name="cutover_backfill_postings_chk_amount"
            ),
        ]

    def __str__(self) -> str:
        return f"backfill of {self.amount} {self.currency} to user {self.user_id}"
