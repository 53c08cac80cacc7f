"""The rehearsal's traffic: worker processes sending random credits and debits (with duplicate
deliveries) through the balance path, and the stages they make up."""

import multiprocessing
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import connection

from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.exceptions import (
    KillSwitchEngaged,
    StrictLedgerFailure,
)
from cutover.selectors import (
    phase_state,
)
from ledger.exceptions import InsufficientFunds
from rehearsal.runtime import latency_summary, processes_run
from rehearsal.scenario import CENT

_progress = None  # shared with forked workers: operations finished


@dataclass
class Traffic:
    operations: int = 0
    applied: int = 0
    replays: int = 0
    refused_overdrafts: int = 0
    refused_other: int = 0
    credited: dict[str, Decimal] = field(default_factory=dict)  # per currency
    debited: dict[str, Decimal] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, other: "Traffic") -> None:
        for name in ("operations", "applied", "replays", "refused_overdrafts", "refused_other"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.credited, other.credited), (self.debited, other.debited)):
            for currency, amount in theirs.items():
                mine[currency] = mine.get(currency, Decimal(0)) + amount
        self.latencies_ms += other.latencies_ms


def traffic_worker(stage: str, worker: int, users: list, operations: int, seed: int):
    """Random credits and debits through the balance path, each user in its own currency; one
    in twenty is a duplicate delivery of an earlier mutation, which must be applied once."""
    rng = random.Random(f"{seed}-{stage}-{worker}")
    traffic, sent = Traffic(), []
    for index in range(operations):
        if sent and rng.random() < 0.05:
            reference, user, currency, credit, amount = rng.choice(sent)
        else:
            reference = f"{stage}-{worker}-{index}"
            (user, currency), credit = rng.choice(users), rng.random() < 0.55
            amount = Decimal(rng.randint(1, 20000)) * CENT
        started = time.perf_counter()
        try:
            mutate = balance_credit if credit else balance_debit
            result = mutate(
                user_id=user,
                amount=amount,
                currency=currency,
                reference=reference,
                reason="rehearsal",
            )
        except InsufficientFunds:
            traffic.refused_overdrafts += 1
        except (KillSwitchEngaged, StrictLedgerFailure):
            traffic.refused_other += 1
        else:
            traffic.latencies_ms.append((time.perf_counter() - started) * 1000)
            if result.created:
                traffic.applied += 1
                sent.append((reference, user, currency, credit, amount))
                moved = traffic.credited if credit else traffic.debited
                moved[currency] = moved.get(currency, Decimal(0)) + amount
            else:
                traffic.replays += 1
        traffic.operations += 1
        with _progress.get_lock():
            _progress.value += 1
    connection.close()
    return traffic


def backfill_worker(chunk_size: int):
    result = backfill_run(chunk_size=chunk_size)
    connection.close()
    return result


def _role(name: str, *args):
    return {"traffic": traffic_worker, "backfill": backfill_worker}[name](*args)


@dataclass
class Stage:
    name: str
    phase: str
    traffic: Traffic
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        t = self.traffic
        return {
            "stage": self.name,
            "phase": self.phase,
            "operations": t.operations,
            "applied": t.applied,
            "replays": t.replays,
            "refused_overdrafts": t.refused_overdrafts,
            "refused_other": t.refused_other,
            "mutations_per_second": round(t.applied / self.seconds, 1) if self.seconds else 0.0,
            **latency_summary(t.latencies_ms),
            "notes": self.notes,
        }


class TrafficStages:
    """A stage of traffic from several processes (with the backfill beside it when asked)."""

    def _traffic(self, name: str, with_backfill: bool = False, share: int = 1) -> None:
        global _progress
        _progress = multiprocessing.get_context("fork").Value("q", 0)
        operations = max(self.workers, self.operations // share)
        per_worker = operations // self.workers
        users = [(user, self.currency_of[user]) for user in self.user_ids]
        jobs = [("traffic", name, w, users, per_worker, self.seed) for w in range(self.workers)]
        if with_backfill:
            jobs.append(("backfill", 50))
        started = time.perf_counter()
        results = processes_run(
            _role,
            jobs,
            on_tick=lambda: self.on_progress(name, _progress.value, per_worker * self.workers),
        )
        seconds = time.perf_counter() - started
        traffic = Traffic()
        for result in results[: self.workers]:
            traffic.add(result)
        self.total.add(traffic)
        stage = Stage(name, phase_state().phase, traffic, seconds)
        if with_backfill:
            stage.notes.append(
                f"backfill ran under this traffic: {results[-1].postings} opening postings"
            )
        self.stages.append(stage)
