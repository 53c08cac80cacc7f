"""`python manage.py bench posting`: benchmarks that print numbers beside their reference."""

import time
from contextlib import ExitStack

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections
from rich.console import Console
from rich.table import Table

from cutover.actors import Actor
from cutover.operators import api_client_issue
from gateway.commands import command_console, json_text, progress_bar
from onchain.sandbox import CircleSandbox
from rehearsal.bench_arguments import bench_arguments_add
from rehearsal.bench_backfill import (
    backfill_measure,
    backfill_seed,
    backfill_workers_measure,
    gates_measure,
    gates_seed,
    ledger_verified,
)
from rehearsal.bench_http import (
    WARMUP_SECONDS,
    api_server,
    reads_measure,
    webhook_users,
    webhooks_measure,
    webhooks_server,
)
from rehearsal.bench_reconcile import reconcile_injected, reconcile_measure, reconcile_seed
from rehearsal.benchmarks import (
    POSTING_SHADOW_GOAL,
    bench_users_in_phase,
    pgbench_binary,
    posting_compare,
    posting_path,
)
from rehearsal.runtime import (
    database_ready,
    existing_database,
    scratch_database,
)

# The CPU of `bench webhooks` per accepted notification, by process (rehearsal.cpu): gunicorn,
# PostgreSQL, the senders (this process's threads).
WEBHOOK_CPU_GROUPS = ("server", "postgres", "senders")


class Command(BaseCommand):
    help = "Benchmarks. `posting`: our posting path side by side with pgbench on the same server."

    def add_arguments(self, parser: CommandParser) -> None:
        bench_arguments_add(parser)

    def handle(self, *args, **options) -> None:
        if options["benchmark"] == "gates":
            return self._gates(options)
        if options["benchmark"] == "backfill":
            return self._backfill(options)
        if options["benchmark"] == "webhooks":
            return self._webhooks(options)
        if options["benchmark"] == "reconcile":
            return self._reconcile(options)
        if options["benchmark"] == "reads":
            return self._reads(options)
        try:
            pgbench_binary()
        except FileNotFoundError as exc:
            raise CommandError(str(exc)) from None
        if options["accounts"] < 2:
            raise CommandError("--accounts: at least 2 accounts are needed")
        console = command_console(self.stdout._out, quiet=options["json"])
        phase = options["phase"]
        path = posting_path(phase)
        with database_ready(console.print):
            rows = posting_compare(
                options["clients"], options["seconds"], options["accounts"], phase, console.print
            )
        beside_legacy = "legacy" in rows[0]
        data = {"benchmark": "posting", "path": path, "results": rows}
        columns = ["clients", "ours/s", "p50 ms", "p95 ms", "p99 ms"]
        if beside_legacy:
            data["goal"] = POSTING_SHADOW_GOAL
            columns += ["legacy/s", "legacy p95 ms", "p95 / legacy"]
        columns += ["pgbench/s", "pgbench avg ms", "ratio"]
        self._show(
            options,
            console,
            data,
            f"bench posting: {path} vs pgbench plain-SQL posting",
            tuple(columns),
            [_posting_row(row) for row in rows],
        )
        if not options["json"]:
            for row in rows:
                split = _posting_cpu(row)
                if split:
                    console.print(f"CPU per posting at {row['clients']} clients: {split}")
        if beside_legacy and not options["json"]:
            goal = POSTING_SHADOW_GOAL
            console.print(
                f"Goal at {goal['clients']} clients in {goal['phase']}: p95 at most "
                f"{goal['p95_over_legacy_at_most']}x legacy-only's, ratio to pgbench at least "
                f"{goal['ratio_at_least']}"
            )

    def _reconcile(self, options) -> None:
        console = command_console(self.stdout._out, quiet=options["json"])
        users, injected = options["users"], options["differences"]
        seconds_seeding = None
        with ExitStack() as stack:
            stack.enter_context(database_ready(console.print))
            if options["reuse"]:
                name = stack.enter_context(existing_database(options["reuse"]))
                console.print(f"Reusing {name} ...")
            else:
                name = stack.enter_context(scratch_database("bench", keep=options["seed_only"]))
                console.print(f"Seeding {users:,} users in both stores in {name} ...")
                with progress_bar(console, "seeding") as progress:
                    task = progress.add_task("seed", total=users)
                    started = time.perf_counter()
                    reconcile_seed(
                        users,
                        injected,
                        on_progress=lambda done: progress.update(task, completed=done),
                    )
                    seconds_seeding = round(time.perf_counter() - started, 1)
                if options["seed_only"]:
                    console.print(f"Seeded in {seconds_seeding} s; kept as {name}")
                    if options["json"]:
                        self.stdout.write(
                            json_text({"database": name, "seed_seconds": seconds_seeding})
                        )
                    return
            expected = reconcile_injected(users, injected)
            if seconds_seeding is not None:
                console.print(f"Seeded in {seconds_seeding} s")
            rows = []
            for workers in options["workers"]:
                console.print(f"Reconciling with {workers} worker(s) ...")
                rows.append(reconcile_measure(name, workers, expected))
        result = {
            "benchmark": "reconcile",
            "users": users,
            "differences_injected": injected,
            "seed_seconds": seconds_seeding,
            "goal_seconds_with_2_workers": 30,
            "goal_users": 10_000_000,
            "goal_peak_rss_mb_per_worker": 200,
            "results": rows,
        }
        self._show(
            options,
            console,
            result,
            f"bench reconcile: {users:,} users (goal: 10,000,000 in < 30 s with 2 workers, "
            "all injected differences found, < 200 MB per pool process)",
            (
                "workers",
                "chunks",
                "users checked",
                "found / injected",
                "all injected found",
                "seconds",
                "peak RSS MB: pool process",
                "worker (main + pool)",
            ),
            [
                (
                    str(row["workers"]),
                    str(row["chunks"]),
                    f"{row['users_checked']:,}",
                    f"{row['differences_found']} / {injected}",
                    "yes" if row["all_injected_found"] else "NO",
                    f"{row['seconds']:.2f}",
                    f"{row['peak_rss_mb_pool_process']:.0f}",
                    f"{row['peak_rss_mb_per_worker']:.0f}",
                )
                for row in rows
            ],
        )

    def _reads(self, options) -> None:
        console = command_console(self.stdout._out, quiet=options["json"])
        with database_ready(console.print), scratch_database("bench") as name:
            console.print(f"Opening {options['users']:,} users in read_switch (100 %) ...")
            users = bench_users_in_phase(options["users"], "read_switch")
            _, token = api_client_issue(
                name="bench-reads", scopes=["read"], actor=Actor.command_line()
            )
            connections.close_all()
            with api_server(name) as port:
                console.print(
                    f"{options['rps']} requests/s for {WARMUP_SECONDS} s (warm-up, not "
                    f"counted), then {options['seconds']} s, against gunicorn on "
                    f"127.0.0.1:{port} ..."
                )
                result = reads_measure(port, token, users, options["rps"], options["seconds"])
        result["goal_p99_ms"] = 25
        self._show(
            options,
            console,
            {"benchmark": "reads", **result},
            "bench reads: GET balance in read_switch (goal p99 < 25 ms)",
            ("requests", "errors", "achieved rps", "p50 ms", "p95 ms", "p99 ms", "max ms"),
            [
                (
                    str(result["requests"]),
                    str(result["errors"]),
                    f"{result['achieved_rps']:.0f}",
                    *_latencies(result),
                    f"{result['max_ms']:.2f}",
                )
            ],
        )

    def _webhooks(self, options) -> None:
        if not 0 <= options["redeliver"] <= 1:
            raise CommandError("--redeliver: a share between 0 and 1")
        console = command_console(self.stdout._out, quiet=options["json"])
        with (
            database_ready(console.print),
            scratch_database("bench") as name,
            CircleSandbox() as sandbox,
        ):
            console.print(f"Opening {options['users']:,} users with deposit addresses ...")
            addresses = webhook_users(options["users"])
            with webhooks_server(name, sandbox) as port:
                console.print(
                    f"{options['senders']} senders for {options['seconds']} s against the floor "
                    f"and {options['seconds']} s against the product, taking turns, on gunicorn "
                    f"on 127.0.0.1:{port} ..."
                )
                result = webhooks_measure(
                    port,
                    sandbox,
                    addresses,
                    options["senders"],
                    options["seconds"],
                    options["redeliver"],
                )
        result.update(goal_ratio=0.6, goal_p99_ms=50)
        floor = result["floor"]
        self._show(
            options,
            console,
            {"benchmark": "webhooks", **result},
            "bench webhooks: signed custody.transfer notifications in shadow, the product beside "
            "the floor (goal: ratio >= 0.6, p99 < 50 ms at 10 senders)",
            (
                "endpoint",
                "deliveries",
                "statuses",
                "accepted/s",
                "ratio",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                *(f"{group} CPU us" for group in WEBHOOK_CPU_GROUPS),
            ),
            [
                (
                    endpoint,
                    str(figures["deliveries"]),
                    " ".join(f"{k}:{v}" for k, v in figures["statuses"].items()),
                    f"{figures['accepted_per_second']:.0f}",
                    ratio,
                    *_latencies(figures),
                    *_cpu_cells(figures, WEBHOOK_CPU_GROUPS),
                )
                for endpoint, figures, ratio in (
                    ("floor", floor, ""),
                    ("product", result, f"{result['ratio']:.2f}"),
                )
            ],
        )

    def _backfill(self, options) -> None:
        if options["old_users"] < 0:
            raise CommandError("--old-users: 0 or more")
        console = command_console(self.stdout._out, quiet=options["json"])
        runs = [("chunked", options["users"], workers) for workers in options["workers"] or [0]]
        if options["old_users"]:
            runs.append(("per_user", options["old_users"], 0))
        rows = []
        with database_ready(console.print):
            for path, users, workers in runs:
                with scratch_database("bench") as name:
                    console.print(f"Seeding {users:,} legacy users in {name} ...")
                    backfill_seed(users, options["custody"])
                    by = f" by {workers} Celery worker(s)" if workers else ""
                    console.print(
                        f"{path} backfill of {users:,} users{by}, {options['rps']} live "
                        "mutations/s through the balance path ..."
                    )
                    if workers:
                        row = backfill_workers_measure(
                            name,
                            workers,
                            users,
                            options["chunk_size"],
                            options["rps"],
                            idle=5.0,
                            range_users=options["range_users"],
                        )
                    else:
                        row = backfill_measure(
                            path, users, options["chunk_size"], options["rps"], idle=5.0
                        )
                    console.print("ledger verify ...")
                    row["ledger_verified"] = ledger_verified()
                rows.append(row)
        goal = {"users": 1_000_000, "seconds": 600, "live_p99_ms": 50}
        self._show(
            options,
            console,
            {"benchmark": "backfill", "goal": goal, "custody": options["custody"], "results": rows},
            "bench backfill: live mutations' p99 before it (idle) and during it (goal: "
            "1,000,000 users in < 10 min, i.e. >= 1,667 users/s, with live p99 < 50 ms)",
            ("path", "users", "s", "users/s", "p99 idle", "p99 ms", "RSS MB", "verify"),
            [
                (
                    row["path"],
                    f"{row['users']:,}",
                    f"{row['seconds']:.0f}",
                    f"{row['users_per_second']:,.0f}",
                    f"{row['live_before']['p99_ms']:.0f}",
                    f"{row['live_during']['p99_ms']:.0f}",
                    f"{row['peak_rss_mb']:.0f}",
                    "clean" if row["ledger_verified"] else "FAILED",
                )
                for row in rows
            ],
        )

    def _gates(self, options) -> None:
        console = command_console(self.stdout._out, quiet=options["json"])
        users = options["users"]
        with database_ready(console.print), scratch_database("bench") as name:
            console.print(f"Seeding {users:,} users in both stores in {name} ...")
            with progress_bar(console, "seeding") as progress:
                task = progress.add_task("seed", total=users)
                gates_seed(users, on_progress=lambda done: progress.update(task, completed=done))
            console.print("Advancing legacy -> shadow -> read_switch -> strict -> cutover ...")
            rows = gates_measure()
        self._show(
            options,
            console,
            {"benchmark": "gates", "users": users, "goal_fence_ms": 2000, "results": rows},
            f"bench gates at {users:,} users: the evidence outside the write fence, the final "
            "proof under it (goal: fence < 2,000 ms at 1,000,000 users)",
            ("gate", "evidence", "passed", "whole s", "fence ms (goal < 2000)"),
            [
                (
                    row["gate"],
                    row["evidence"],
                    "yes" if row["passed"] else "no",
                    f"{row['seconds']:.2f}",
                    f"{row['fence_ms']:.0f}",
                )
                for row in rows
            ],
        )

    def _show(
        self,
        options,
        console: Console,
        data: dict,
        title: str,
        columns: tuple[str, ...],
        rows: list[tuple[str, ...]],
    ) -> None:
        """The results as JSON with --json; otherwise one right-aligned table of them."""
        if options["json"]:
            self.stdout.write(json_text(data))
            return
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def _posting_row(row: dict) -> tuple[str, ...]:
    cells = [str(row["clients"]), f"{row['ours']['per_second']:.0f}", *_latencies(row["ours"])]
    if "legacy" in row:
        cells += [
            f"{row['legacy']['per_second']:.0f}",
            f"{row['legacy']['p95_ms']:.2f}",
            f"{row['p95_over_legacy']:.2f}",
        ]
    return (
        *cells,
        f"{row['pgbench']['per_second']:.0f}",
        f"{row['pgbench']['latency_avg_ms']:.2f}",
        f"{row['ratio']:.2f}",
    )


def _posting_cpu(row: dict) -> str:
    """Where each measurement's CPU went, per posting: "ours PostgreSQL 900 us + client 250 us;
    ..." (empty where the machine cannot say)."""
    parts = []
    for name in ("ours", "legacy", "pgbench"):
        split = row.get(name, {}).get("cpu_us_per_posting")
        if split:
            parts.append(
                f"{name} PostgreSQL {split.get('postgres', 0):,} us + "
                f"client {split.get('client', 0):,} us"
            )
    return "; ".join(parts)


def _cpu_cells(figures: dict, groups: tuple[str, ...]) -> tuple[str, ...]:
    split = figures.get("cpu_us_per_accepted") or {}
    return tuple(f"{split[group]:,}" if group in split else "" for group in groups)


def _latencies(figures: dict) -> tuple[str, str, str]:
    """p50, p95 and p99 in ms, to the hundredth."""
    return (f"{figures['p50_ms']:.2f}", f"{figures['p95_ms']:.2f}", f"{figures['p99_ms']:.2f}")
