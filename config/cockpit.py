"""The operators' cockpit: the whole rollout at a glance (the admin index; its charts, and
`rehearse --html`'s, are config.cockpit_charts). It reads every app (the phase machine's state
and gates, the treasury's buffers and bands and the conversion jobs only an operator can end,
the on-chain engine's dead withdrawals and parked notifications), so it lives in the
composition root, above them all; it writes nothing (the actions are the services')."""

from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone
from django.utils.timesince import timesince

from cutover import history
from cutover.gates import Gate, gate_evaluate
from cutover.models import PhaseAudit, PhaseState, ReconciliationRun, RunStatus
from cutover.phases import Phase, next_phase
from cutover.selectors import (
    ledger_write_stats,
    open_custody_discrepancy_count,
    open_discrepancy_count,
    phase_state,
    strict_failure_count_in_phase,
)
from ledger.templatetags.console import amount_display
from onchain.models import InboxStatus
from onchain.selectors import dead_withdrawal_count, notification_count
from treasury.selectors import BufferReading, buffer_status_list, jobs_for_an_operator

# The read-percentage steps of read_switch (README: 1, then 10, 50, 100; it only grows).
READ_STEPS = (1, 10, 50, 100)


@dataclass(frozen=True)
class BufferBand:
    reading: BufferReading

    @property
    def balance(self) -> str:
        return amount_display(self.reading.balance, self.reading.currency)

    @property
    def band(self) -> str:
        r = self.reading
        return f"{amount_display(r.minimum, r.currency)} to {amount_display(r.maximum, r.currency)}"

    @property
    def target(self) -> str:
        return amount_display(self.reading.target, self.reading.currency)

    @property
    def state(self) -> str:
        return {"below_min": "below its minimum", "above_max": "above its maximum"}.get(
            self.reading.state, "inside its band"
        )


@dataclass(frozen=True)
class Cockpit:
    state: PhaseState
    now: datetime
    time_in_phase: str
    kill_switch_by: PhaseAudit | None  # the audit row of the engagement, while it is on
    next_phase: Phase | None
    gate: Gate | None  # the next gate's live evidence
    read_steps: list[int]  # the read percentages an advance into / within read_switch offers
    open_discrepancies: int
    open_custody_discrepancies: int
    strict_failures: int  # in the current phase, what the cutover gate reads
    write_stats: dict  # the balance path's ledger writes in the current phase
    last_reconciliation: ReconciliationRun | None
    reconciliation_age: str | None
    buffers: list[BufferBand]
    dead_withdrawals: int
    parked_notifications: int
    jobs: dict[str, int]  # conversion jobs for an operator: disputed, refunded

    @property
    def jobs_for_an_operator(self) -> int:
        return sum(self.jobs.values())

    @property
    def write_success(self) -> str:
        rate = self.write_stats["success_rate"]
        return "none yet" if rate is None else f"{rate:.2%}"


def cockpit_read(*, now: datetime | None = None) -> Cockpit:
    now = now or timezone.now()
    state = phase_state()
    current = Phase(state.phase)
    following = next_phase(current)
    if current == Phase.SHADOW:
        steps = list(READ_STEPS)
    elif current == Phase.READ_SWITCH:
        steps = [step for step in READ_STEPS if step > state.read_percent]
    else:
        steps = []
    last_run = ReconciliationRun.objects.filter(status=RunStatus.COMPLETED).first()
    return Cockpit(
        state=state,
        now=now,
        time_in_phase=timesince(state.entered_at, now),  # in words: "2 days, 3 hours"
        kill_switch_by=history.kill_switch_engaged_by() if state.kill_switch else None,
        next_phase=following,
        gate=gate_evaluate(state, following) if following else None,
        read_steps=steps,
        open_discrepancies=open_discrepancy_count(),
        open_custody_discrepancies=open_custody_discrepancy_count(),
        strict_failures=strict_failure_count_in_phase(state),
        write_stats=ledger_write_stats(state.entered_at),
        last_reconciliation=last_run,
        reconciliation_age=timesince(last_run.finished_at, now) if last_run else None,
        buffers=[BufferBand(reading) for reading in buffer_status_list()],
        dead_withdrawals=dead_withdrawal_count(),
        parked_notifications=notification_count(InboxStatus.PARKED),
        jobs=jobs_for_an_operator(),
    )
