"""Fault points: places where a test makes the process die as a crash would, to prove that what
a crash leaves behind is finished after a restart or a retry. Inert unless the environment
names the point: `LEDGER_FAULT_POINT=<point>` makes the process SIGKILL itself there (no
cleanup, no exception handler, no atexit: as a node lost or an OOM kill), at its
`LEDGER_FAULT_AFTER`-th passage through the point (1, the first, by default), so that a
process serves some requests or rows before it dies and one process run makes one kill.

Points, by name (README, "Fault points": what each lies between, and what finishes it):
- `task:<task name>` (config.deliveries): a Celery task's process, once the delivery's attempt
  is counted and before the task's work begins.
- `api:mutation-applied` (cutover.views): the balance API's mutation committed, its
  Idempotency-Key's answer neither stored nor sent.
- `webhook:circle-committed` (onchain.views): a Circle notification stored and applied, the
  200 not sent.
- `webhook:deposit-accepted` (onchain.inbox): a plain deposit's notification stored and
  credited by its one statement (onchain_deposit_notification_accept, committed), nothing
  logged, counted or answered.
- `outbox:claimed` (gateway.outbox): an outbox row claimed and locked, not sent; the rows
  before it in the pass sent and recorded.
- `withdrawal:circle-answered` (onchain.withdrawals): Circle created the transfer, its id not
  recorded.
- `conversion:due-answered` (treasury.submission): Due created the conversion, its id not
  recorded.
- `backfill:chunk-posted` (cutover.backfill): a chunk's postings (its users' differences, their
  posting rows and the run's checkpoint) made, the chunk's transaction not committed.
- `reconcile:recorded` (cutover.reconciliation): at a chunk boundary, a chunk's differences
  and discrepancies committed, the next chunk not taken, the run not completed.
- `cycle:committed` (treasury.cycle): a settlement cycle and its conversion jobs committed,
  the jobs not submitted.
- `rollback:legacy-rebuilt` (cutover.phase_machine): the legacy store rebuilt from the ledger
  in the rollback's transaction, the phase not flipped."""

import os
import signal

_passages = 0  # through the point the environment names, in this process


def fault_point(name: str) -> None:
    if os.environ.get("LEDGER_FAULT_POINT") != name:
        return
    global _passages
    _passages += 1
    if _passages >= int(os.environ.get("LEDGER_FAULT_AFTER", "1")):
        os.kill(os.getpid(), signal.SIGKILL)
