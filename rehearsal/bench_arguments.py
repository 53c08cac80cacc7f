"""What each of `manage.py bench`'s benchmarks accepts: its sub-command, arguments and help
(rehearsal.management.commands.bench runs them)."""

from django.core.management.base import CommandParser

from cutover.phases import ORDER
from gateway.commands import PG_INTEGER_MAX, ascii_word, bounded_int, positive_int

# Upper bounds of the benchmarks' counts, beyond which a run cannot be what was meant: a client
# or sender is a connection (PostgreSQL serves 100 by default), a worker a Celery process.
MAX_CLIENTS = 1_000
MAX_WORKERS = 64
MAX_SECONDS = 24 * 3600
MAX_RPS = 100_000
clients_count = bounded_int(1, MAX_CLIENTS)
workers_count = bounded_int(1, MAX_WORKERS)
seconds_count = bounded_int(1, MAX_SECONDS)
rate = bounded_int(1, MAX_RPS)


def bench_arguments_add(parser: CommandParser) -> None:
    sub = parser.add_subparsers(
        dest="benchmark",
        required=True,
        metavar="{posting,reconcile,reads,webhooks,backfill,gates}",
    )
    posting = sub.add_parser(
        "posting",
        help="postings/s and p50/p95/p99 of transaction_post from N concurrent clients (laid "
        "out as pgbench -j 2 lays out its own: two processes, clients as threads), then "
        "pgbench running an equivalent plain-SQL posting with the same client count, and the "
        "ratio; each measurement's CPU per posting, PostgreSQL's and the client's (run it "
        "alone: every PostgreSQL process on the machine counts)",
    )
    posting.add_argument(
        "--clients",
        type=clients_count,
        nargs="+",
        default=[4],
        help=f"concurrent clients, at most {MAX_CLIENTS:,}; several values run one after "
        "another (4)",
    )
    posting.add_argument(
        "--seconds", type=seconds_count, default=10, help="seconds per measurement (10)"
    )
    posting.add_argument(
        "--accounts", type=positive_int, default=1000, help="accounts to spread over (1000)"
    )
    posting.add_argument(
        "--phase",
        choices=[phase.value for phase in ORDER],
        default=None,
        help="post through the balance path in this rollout phase (legacy write, ledger "
        "posting and compare in shadow), in a scratch database; default: transaction_post "
        "transfers between ledger accounts",
    )
    posting.add_argument("--json", action="store_true", help="print the results as JSON")

    reconcile = sub.add_parser(
        "reconcile",
        help="seed N users in both stores set-based (with a few injected differences) in a "
        "scratch database and time one full reconciliation by 1, 2, ... Celery workers "
        "taking its chunks; goal: 10,000,000 users in < 30 s with 2 workers, every "
        "injected difference found, peak RSS per worker < 200 MB",
    )
    reconcile.add_argument(
        "--users", type=positive_int, default=1_000_000, help="users (1,000,000)"
    )
    reconcile.add_argument(
        "--differences", type=positive_int, default=7, help="injected differences (7)"
    )
    reconcile.add_argument(
        "--workers",
        type=workers_count,
        nargs="+",
        default=[1, 2],
        help=f"Celery worker replicas (one pool process each, at most {MAX_WORKERS}); several "
        "values run one after another on the same seeded database (1 2)",
    )
    seeded = reconcile.add_mutually_exclusive_group()
    seeded.add_argument(
        "--seed-only",
        action="store_true",
        help="seed a scratch database, keep it and print its name (to time it later with "
        "--reuse, e.g. outside the benchmark lock)",
    )
    seeded.add_argument(
        "--reuse",
        type=ascii_word(63),
        metavar="DATABASE",
        help="time against a database seeded with --seed-only (same --users and "
        "--differences); it is kept",
    )
    reconcile.add_argument("--json", action="store_true", help="print the results as JSON")

    reads = sub.add_parser(
        "reads",
        help="GET /api/v1/users/<id>/balance at a fixed rate against gunicorn on loopback, "
        "in read_switch at 100 %%, after 2 s of the same load not counted (the "
        "workers' first requests); goal: p99 < 25 ms at 200 requests/s",
    )
    reads.add_argument("--rps", type=rate, default=200, help="requests/s (200)")
    reads.add_argument("--seconds", type=seconds_count, default=20, help="duration (20)")
    reads.add_argument("--users", type=positive_int, default=10_000, help="users (10,000)")
    reads.add_argument("--json", action="store_true", help="print the results as JSON")

    webhooks = sub.add_parser(
        "webhooks",
        help="signed Circle notifications (completed deposits, some redelivered) from "
        "concurrent senders to gunicorn on loopback, in shadow: a floor endpoint of the "
        "benchmark's own (signature verified, raw body stored) and the product's webhook "
        "take turns under the same load on the same gunicorn, after 1 s of warm-up to "
        "each; goal: product accepted/s >= 0.6 of the floor's with p99 < 50 ms at 10 "
        "senders; the CPU per accepted notification of gunicorn, PostgreSQL and the senders "
        "for each",
    )
    webhooks.add_argument(
        "--senders", type=clients_count, default=10, help=f"senders, at most {MAX_CLIENTS:,} (10)"
    )
    webhooks.add_argument("--seconds", type=seconds_count, default=15, help="duration (15)")
    webhooks.add_argument("--users", type=positive_int, default=1000, help="users (1,000)")
    webhooks.add_argument(
        "--redeliver",
        type=float,
        default=0.2,
        help="share of notifications delivered twice (0.2)",
    )
    webhooks.add_argument("--json", action="store_true", help="print the results as JSON")

    backfill = sub.add_parser(
        "backfill",
        help="seed N legacy users (custody open) in a scratch database and run `cutover "
        "backfill` while live credits and debits flow through the balance path at a fixed "
        "rate; then the per-user path it replaced on --old-users users, under the same "
        "traffic; goal: 1,000,000 users in < 10 min with live p99 < 50 ms",
    )
    backfill.add_argument("--users", type=positive_int, default=1_000_000, help="users (1,000,000)")
    backfill.add_argument(
        "--old-users",
        type=bounded_int(0, PG_INTEGER_MAX),
        default=5_000,
        help="users for the per-user path, too slow for N (5,000; 0: not run)",
    )
    backfill.add_argument(
        "--chunk-size", type=positive_int, default=500, help="users per chunk (500)"
    )
    backfill.add_argument("--rps", type=rate, default=50, help="live mutations a second (50)")
    backfill.add_argument(
        "--workers",
        type=workers_count,
        nargs="+",
        default=None,
        help="run the chunked backfill by this many real Celery workers taking its ranges "
        f"(one pool process each, at most {MAX_WORKERS}; the leader message "
        "`cutover.backfill`), several values one after another, each on a database seeded "
        "afresh (default: in a process of its own)",
    )
    backfill.add_argument(
        "--range-users",
        type=positive_int,
        default=None,
        help="users per range of the run, each taken by one worker at a time "
        "(BACKFILL_RANGE_USERS)",
    )
    backfill.add_argument(
        "--custody",
        action="store_true",
        help="open custody first: live legacy mutations are mirrored against "
        "opening-balance equity, the account each chunk posts against (the contended case)",
    )
    backfill.add_argument("--json", action="store_true", help="print the results as JSON")

    gates = sub.add_parser(
        "gates",
        help="seed N users in both stores (custody open) in a scratch database and walk the "
        "rollout to cutover: how long the gates into shadow (ledger verify) and cutover (the "
        "stores' equality proof) take, and how long of it they hold the write fence; goal: "
        "< 2 s of fence at 1,000,000 users",
    )
    gates.add_argument("--users", type=positive_int, default=1_000_000, help="users (1,000,000)")
    gates.add_argument("--json", action="store_true", help="print the results as JSON")
