"""Where a benchmark's CPU went, by process group, read from /proc: on this 2-core machine the
server under test, PostgreSQL and the load generator share the cores, so a rate alone cannot
say whose work limits it. Each process's time includes the children it has reaped, so a
PostgreSQL backend that exited during the window is counted through the postmaster, a client
process through this one. Every PostgreSQL process on the machine counts, whatever database it
serves: a benchmark's split is its own only when it runs alone on the machine.
Linux only: elsewhere a benchmark prints no split."""

import os
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# pid -> (command line, or the name of an exited process, CPU seconds: user and system,
# its reaped children's included)
CpuReading = dict[int, tuple[str, float]]
Classify = Callable[[int, str], str | None]  # (pid, command line) -> group, or None


def cpu_read() -> CpuReading | None:
    """Every process's CPU seconds so far, or None where /proc cannot say."""
    if not (PROC / "self" / "stat").exists():
        return None
    reading = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)  # the name may hold spaces
        utime, stime, cutime, cstime = (int(value) for value in rest.split()[11:15])
        # An exited process not yet reaped has no command line, only its name: a backend that
        # ends with the measurement's last connection is still counted as PostgreSQL's.
        reading[int(entry.name)] = (command or name, (utime + stime + cutime + cstime) / TICKS)
    return reading


def cpu_spent(before: CpuReading | None, after: CpuReading | None, classify: Classify) -> dict:
    """CPU seconds each group spent between two readings. A process that was there before and
    is gone after was reaped by its parent, whose time now holds all of its own: what it had
    spent before is taken off its group again."""
    if before is None or after is None:
        return {}
    spent: dict[str, float] = {}
    for pid, (command, seconds) in after.items():
        group = classify(pid, command)
        if group:
            spent[group] = spent.get(group, 0.0) + seconds - before.get(pid, ("", 0.0))[1]
    for pid, (command, seconds) in before.items():
        group = classify(pid, command)
        if group and pid not in after:
            spent[group] = spent.get(group, 0.0) - seconds
    return spent


def benchmark_groups(load: str, server: str | None = None) -> Classify:
    """The groups of a benchmark's split: "postgres" (every PostgreSQL server process: the
    postmaster, its backends and background processes), `load` (this process, the load
    generator, with the children it ran and reaped) and, given the address it serves, "server"
    (the gunicorn master and workers bound to `server`)."""

    def classify(pid: int, command: str) -> str | None:
        if command.startswith("postgres") or "/bin/postgres " in command:
            return "postgres"
        if server and "gunicorn" in command and server in command:
            return "server"
        return load if pid == os.getpid() else None

    return classify


def cpu_per_operation(spent: dict, operations: int) -> dict:
    """Microseconds of CPU per operation, by group (empty without a split or operations)."""
    if not operations:
        return {}
    return {group: round(seconds / operations * 1e6) for group, seconds in spent.items()}
