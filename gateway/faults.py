"""Fault points: places where a test makes the process die as a crash would, to prove that what
a crash leaves behind is finished after a restart or a redelivery. Inert unless the environment
names the point: `LEDGER_FAULT_POINT=<point>` makes the process SIGKILL itself there (no
cleanup, no exception handler, no atexit: as a node lost or an OOM kill).

Points, by name:
- `task:<task name>` (config.deliveries): a Celery task's process, once the delivery's attempt
  is counted and before the task's work begins."""

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("LEDGER_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
