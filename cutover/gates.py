"""The evidence at each gate of the rollout: what moving to the next phase requires (time in
phase, open discrepancies, a clean reconciliation, the ledger write's success rate, read
latency, strict failures, the backfill's equality, ledger verify, custody) and the equality
proof of both stores, each check with what it needs and what it found."""

import time
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from cutover.models import CustodyOpening, PhaseState, ReconciliationRun, RunStatus
from cutover.phases import Phase
from cutover.selectors import (
    balance_get,
    known_difference_count,
    ledger_write_stats,
    open_discrepancy_count,
    store_differences,
    store_totals,
    stores_written_since,
    strict_failure_count_in_phase,
)
from ledger.selectors import BUFFER_ACCOUNTS, Snapshot, ledger_integrity_checks

READ_LATENCY_SAMPLE = 200


@dataclass
class GateCheck:
    name: str
    required: str
    actual: str
    ok: bool


@dataclass
class Gate:
    from_phase: str
    to_phase: str
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)

    def as_evidence(self) -> dict:
        return {
            "from": self.from_phase,
            "to": self.to_phase,
            "passed": self.passed,
            "evaluated_at": timezone.now().isoformat(),
            "checks": [check.__dict__ for check in self.checks],
        }

    def failures(self) -> str:
        return "; ".join(
            f"{c.name}: needs {c.required}, is {c.actual}" for c in self.checks if not c.ok
        )


def _duration_check(state: PhaseState, minimum: timedelta) -> GateCheck:
    elapsed = timezone.now() - state.entered_at
    return GateCheck(
        "time_in_phase",
        f">= {minimum}",
        str(elapsed).split(".")[0],
        elapsed >= minimum,
    )


def _discrepancy_check() -> GateCheck:
    count = open_discrepancy_count()
    known = known_difference_count()
    actual = f"{count}" + (f" ({known} known differences not counted)" if known else "")
    return GateCheck("open_discrepancies", "0", actual, count == 0)


def _reconciliation_check(state: PhaseState) -> GateCheck:
    run = ReconciliationRun.objects.filter(
        status=RunStatus.COMPLETED, started_at__gte=state.entered_at
    ).first()
    if run is None:
        return GateCheck("reconciliation", "a clean full run in this phase", "none yet", False)
    return GateCheck(
        "reconciliation",
        "last full run in this phase clean",
        f"{run.differences} differences"
        + (f" ({run.known_differences} known)" if run.known_differences else "")
        + f" at {run.finished_at:%Y-%m-%d %H:%M:%S}",
        run.clean,
    )


def _write_rate_check(state: PhaseState) -> GateCheck:
    stats = ledger_write_stats(state.entered_at)
    minimum = settings.CUTOVER_MIN_WRITE_SUCCESS_RATE
    rate = stats["success_rate"]
    actual = "no ledger writes yet" if rate is None else f"{rate:.4%} of {stats['attempts']}"
    return GateCheck(
        "ledger_write_success", f">= {minimum:.1%}", actual, rate is not None and rate >= minimum
    )


def read_latency_p99_ms(sample: int = READ_LATENCY_SAMPLE) -> float | None:
    """p99 of balance reads through the balance path, measured now on up to `sample` users."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT user_id, currency FROM balances ORDER BY user_id LIMIT %s", [sample])
        users = cursor.fetchall()
    if not users:
        return None
    timings = []
    for user_id, currency in users:
        started = time.perf_counter()
        balance_get(user_id=user_id, currency=currency)
        timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    return timings[min(len(timings) - 1, int(len(timings) * 0.99))]


def _read_latency_check() -> GateCheck:
    budget = settings.CUTOVER_READ_P99_BUDGET_MS
    p99 = read_latency_p99_ms()
    actual = "no users to read" if p99 is None else f"{p99:.2f} ms"
    return GateCheck("read_p99", f"<= {budget} ms", actual, p99 is not None and p99 <= budget)


def _read_percent_check(state: PhaseState) -> GateCheck:
    return GateCheck("read_percent", "100", str(state.read_percent), state.read_percent == 100)


def _strict_failure_check(state: PhaseState) -> GateCheck:
    count = strict_failure_count_in_phase(state)
    return GateCheck("strict_failures", "0", str(count), count == 0)


def _backfill_check(since: Snapshot | None) -> GateCheck:
    required = "every legacy balance in the ledger"
    if since is None:
        count, _ = store_differences(limit=0)
        return GateCheck("backfill", required, f"{count} users differ", count == 0)
    stores = stores_written_since(since)
    return GateCheck(
        "backfill",
        f"{required} (the users written since the evidence, and the totals)",
        f"{len(stores.differing)} of {stores.written} users written since differ; legacy "
        f"total {stores.legacy_total}, ledger total {stores.ledger_total}",
        stores.equal,
    )


def _ledger_integrity_check(since: Snapshot | None) -> GateCheck:
    failed = [check.name for check in ledger_integrity_checks(since) if not check.ok]
    required = "clean" if since is None else "clean (what was written since the evidence)"
    return GateCheck("ledger_verify", required, ", ".join(failed) or "clean", not failed)


def _custody_check(currency: str) -> GateCheck:
    opening = CustodyOpening.objects.filter(currency=currency).first()
    actual = (
        f"opened at {opening.reported} from {opening.source} ({opening.opened_at:%Y-%m-%d %H:%M})"
        if opening
        else "not opened"
    )
    return GateCheck(
        f"custody_{currency.lower()}",
        f"{BUFFER_ACCOUNTS[currency]} opened from the provider's balance",
        actual,
        opening is not None,
    )


def equality_proof(since: Snapshot | None = None) -> GateCheck:
    """Per-user equality and equal totals of both stores. With `since`, a snapshot in which
    the full proof held: the users either store wrote after it, and the totals (the final
    proof, under the write fence)."""
    if since is not None:
        stores = stores_written_since(since)
        actual = (
            f"{len(stores.differing)} of {stores.written} users written since the evidence "
            f"differ, legacy total {stores.legacy_total}, ledger total {stores.ledger_total}, "
            f"{stores.legacy_users} users"
        )
        if stores.differing:
            actual += f"; e.g. {stores.differing[0]}"
        return GateCheck(
            "stores_equal",
            "every user written since the evidence equal and totals equal",
            actual,
            stores.equal,
        )
    count, first = store_differences(limit=5)
    totals = store_totals()
    equal = count == 0 and totals["legacy_total"] == totals["ledger_total"]
    actual = (
        f"{count} users differ, legacy total {totals['legacy_total']}, "
        f"ledger total {totals['ledger_total']}, {totals['legacy_users']} users"
    )
    if first:
        actual += f"; e.g. {first[0]}"
    return GateCheck("stores_equal", "every user equal and totals equal", actual, equal)


def gate_evaluate(state: PhaseState, to: Phase, since: Snapshot | None = None) -> Gate:
    """The evidence for moving from the current phase to `to` (the next one). With `since`, a
    snapshot in which this gate's evidence was computed and held: the checks that pass over
    every user or entry (the backfill's equality, ledger verify) prove only what was written
    after it, the others are taken again (the final proof under the write fence)."""
    gate = Gate(state.phase, to.value)
    if to == Phase.SHADOW:
        gate.checks += [
            _backfill_check(since),
            _ledger_integrity_check(since),
            *(_custody_check(currency) for currency in BUFFER_ACCOUNTS),
        ]
    elif to == Phase.READ_SWITCH:
        gate.checks += [
            _duration_check(state, settings.CUTOVER_SHADOW_MIN_DURATION),
            _discrepancy_check(),
            _reconciliation_check(state),
            _write_rate_check(state),
        ]
    elif to == Phase.STRICT:
        gate.checks += [
            _duration_check(state, settings.CUTOVER_READ_SWITCH_MIN_DURATION),
            _discrepancy_check(),
            _reconciliation_check(state),
            _read_percent_check(state),
            _read_latency_check(),
        ]
    elif to == Phase.CUTOVER:
        gate.checks += [
            _duration_check(state, settings.CUTOVER_STRICT_MIN_DURATION),
            _discrepancy_check(),
            _reconciliation_check(state),
            _strict_failure_check(state),
        ]
    return gate
