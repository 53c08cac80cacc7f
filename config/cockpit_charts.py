"""The cockpit's charts (the admin index's, and `rehearse --html`'s over a run): each read from the
apps' histories (cutover.history, the ledger's balance history, the treasury's buffers) into a
Chart (SVG drawn by config.charts) with its figures as a table under it."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

from config import charts
from cutover import history
from cutover.models import AuditAction
from cutover.phases import Phase
from ledger.selectors import BUFFER_ACCOUNTS, account_balance_history
from ledger.templatetags.console import amount_display
from treasury.selectors import buffer_status_list

PHASE_COLORS = {
    Phase.LEGACY: "#757575",
    Phase.SHADOW: "#1e63c4",
    Phase.READ_SWITCH: "#7b4bb7",
    Phase.STRICT: "#b85c00",
    Phase.CUTOVER: "#2e7d32",
}
KILL_SWITCH_COLOR = "#c62828"
OPENED_COLOR, RESOLVED_COLOR, RATE_COLOR = "#c62828", "#2e7d32", "#1e63c4"
LEGACY_COLOR, LEDGER_COLOR, MISMATCH_COLOR = "#b85c00", "#1e63c4", "#ef9a9a"


@dataclass(frozen=True)
class Window:
    since: datetime
    width: timedelta


@dataclass(frozen=True)
class ChartTable:
    """A chart's figures as a table under it, for who would rather read them."""

    table_id: str
    headers: list[str]
    rows: list[list[str]]
    empty: str  # said instead of a table without rows


@dataclass(frozen=True)
class Chart:
    chart_id: str
    title: str
    svg: SafeString
    table: ChartTable | None = None


# Bucket widths a window is cut into (the smallest giving at most `buckets` of them).
WIDTHS = [
    timedelta(seconds=s)
    for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600)
] + [timedelta(days=1)]


def bucket_width_for(span: timedelta, buckets: int = 30) -> timedelta:
    return next((w for w in WIDTHS if span / w <= buckets), WIDTHS[-1])


def bucket_label(start: datetime, width: timedelta) -> str:
    if width >= timedelta(days=1):
        return f"{start:%m-%d}"
    if width >= timedelta(hours=1):
        return f"{start:%d %H:%M}"
    if width >= timedelta(minutes=1):
        return f"{start:%H:%M}"
    return f"{start:%H:%M:%S}"


def _bucket_name(width: timedelta) -> str:
    """ "day", "6 hours", "5 seconds": what one bucket of the window spans."""
    seconds = int(width.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            return unit if seconds == size else f"{seconds // size} {unit}s"
    return f"{width.total_seconds()} seconds"


def _percent(value: float) -> str:
    return f"{value:.1f} %" if value < 99 or value == 100 else f"{value:.2f} %"


def _rate(value: float) -> str:
    """A small rate in percent, as precisely as it needs (0.05 %, 2.5 %, 100 %)."""
    return f"{value:.2f}".rstrip("0").rstrip(".") + " %"


def _ms(microseconds: int | None) -> str:
    return "" if microseconds is None else f"{microseconds / 1000:,.2f}"


def discrepancies_chart(window: Window, until: datetime) -> Chart:
    rows = history.discrepancies_per_bucket(since=window.since, until=until, width=window.width)
    per = _bucket_name(window.width)
    opened, resolved = sum(r.opened for r in rows), sum(r.resolved for r in rows)
    title = f"Discrepancies opened and resolved per {per}"
    return Chart(
        "chart-discrepancies",
        title,
        charts.bar_chart(
            chart_id="chart-discrepancies",
            title=title,
            desc=f"From {window.since:%Y-%m-%d %H:%M} UTC: {opened} opened, {resolved} resolved.",
            labels=[bucket_label(r.start, window.width) for r in rows],
            series=[
                charts.Series("opened", [r.opened for r in rows], OPENED_COLOR),
                charts.Series("resolved", [r.resolved for r in rows], RESOLVED_COLOR),
            ],
            x_label="time (UTC)",
            y_label="discrepancies",
            counts=True,
        ),
    )


def write_success_chart(window: Window, until: datetime) -> Chart:
    """The ledger write success rate per bucket against the gate's minimum."""
    rows = history.ledger_writes_per_bucket(since=window.since, until=until, width=window.width)
    per = _bucket_name(window.width)
    minimum = float(settings.CUTOVER_MIN_WRITE_SUCCESS_RATE) * 100
    rates = [None if r.success_rate is None else r.success_rate * 100 for r in rows]
    lowest = min([minimum, *(r for r in rates if r is not None)])
    attempts, posted = sum(r.attempts for r in rows), sum(r.posted for r in rows)
    title = f"Ledger write success rate per {per}"
    return Chart(
        "chart-write-success",
        title,
        charts.line_chart(
            chart_id="chart-write-success",
            title=title,
            desc=f"From {window.since:%Y-%m-%d %H:%M} UTC: {posted} of {attempts} ledger "
            f"writes succeeded; the gate out of shadow needs {minimum:.1f} %. Buckets "
            "without ledger writes have no point.",
            labels=[bucket_label(r.start, window.width) for r in rows],
            series=[charts.Series("succeeded", rates, RATE_COLOR)],
            x_label="time (UTC)",
            y_label="ledger writes succeeded (%)",
            y_min=99.0 if lowest >= 99 else 90.0 if lowest >= 90 else 0.0,
            y_max=100.0,
            rules=[charts.Rule(minimum, "gate minimum", KILL_SWITCH_COLOR)],
            fmt=_percent,
        ),
    )


EXPERIMENT_HEADERS = [
    "time (UTC)",
    "dual writes",
    "mismatches",
    "mismatch rate",
    "legacy p50 ms",
    "legacy p95 ms",
    "ledger p50 ms",
    "ledger p95 ms",
]


def experiment_chart(window: Window, until: datetime) -> Chart:
    """The shadow experiment per bucket, as Scientist reports it: the legacy write (control)
    and the ledger write (candidate), p50 and p95 of each as lines in milliseconds, and the
    mismatch rate as bars on a second axis; the figures in a table under it."""
    rows = history.experiment_per_bucket(since=window.since, until=until, width=window.width)
    per = _bucket_name(window.width)
    labels = [bucket_label(r.start, window.width) for r in rows]

    def line(name: str, field: str, color: str, dash: str = "") -> charts.Series:
        values = [getattr(r, field) for r in rows]
        return charts.Series(name, [None if v is None else v / 1000 for v in values], color, dash)

    experiments = sum(r.experiments for r in rows)
    differed = sum(r.mismatches + r.strict_failures for r in rows)
    strict = sum(r.strict_failures for r in rows)
    measured = [r for r in rows if r.experiments]
    title = f"Legacy vs ledger write time and mismatch rate per {per}"
    return Chart(
        "chart-experiment",
        title,
        charts.line_chart(
            chart_id="chart-experiment",
            title=title,
            desc=f"From {window.since:%Y-%m-%d %H:%M} UTC: {experiments} dual writes, "
            f"{differed} of them mismatched ({strict} failed in strict); the time of each "
            "store's write inside the balance path, p50 and p95 per bucket. Buckets without "
            "dual writes have no point.",
            labels=labels,
            series=[
                line("legacy p50", "legacy_p50_us", LEGACY_COLOR),
                line("legacy p95", "legacy_p95_us", LEGACY_COLOR, "6 3"),
                line("ledger p50", "ledger_p50_us", LEDGER_COLOR),
                line("ledger p95", "ledger_p95_us", LEDGER_COLOR, "6 3"),
            ],
            x_label="time (UTC)",
            y_label="write time (ms)",
            fmt=lambda v: f"{v:,.2f}",
            right=charts.RightAxis(
                "dual writes mismatched (%)",
                [
                    charts.Series(
                        "mismatch rate",
                        [None if r.mismatch_rate is None else r.mismatch_rate * 100 for r in rows],
                        MISMATCH_COLOR,
                    )
                ],
                fmt=_rate,
            ),
        ),
        ChartTable(
            "table-experiment",
            EXPERIMENT_HEADERS,
            [
                [
                    bucket_label(r.start, window.width),
                    f"{r.experiments:,}",
                    f"{r.mismatches + r.strict_failures:,}",
                    _rate(r.mismatch_rate * 100),
                    _ms(r.legacy_p50_us),
                    _ms(r.legacy_p95_us),
                    _ms(r.ledger_p50_us),
                    _ms(r.ledger_p95_us),
                ]
                for r in measured
            ],
            f"No dual writes since {window.since:%Y-%m-%d %H:%M} UTC.",
        ),
    )


def buffer_charts(window: Window, until: datetime) -> list[Chart]:
    """Each buffer's ledger balance at the end of every bucket (from its entries), against its
    band as the treasury's thresholds set it now."""
    starts = history.bucket_starts(since=window.since, until=until, width=window.width)
    per = _bucket_name(window.width)
    found = []
    for reading in buffer_status_list():
        opening, changed = account_balance_history(
            code=BUFFER_ACCOUNTS[reading.currency],
            since=window.since,
            until=until,
            width=window.width,
        )
        balances, balance = [], opening
        for start in starts:
            balance = changed.get(start, balance)
            balances.append(float(balance))
        chart_id = f"chart-buffer-{reading.currency.lower()}"
        title = f"{reading.account} ({reading.currency}) against its band, per {per}"
        found.append(
            Chart(
                chart_id,
                title,
                charts.line_chart(
                    chart_id=chart_id,
                    title=title,
                    desc=f"The {reading.account} balance from {window.since:%Y-%m-%d %H:%M} UTC "
                    f"({amount_display(opening, reading.currency)}) to now "
                    f"({amount_display(reading.balance, reading.currency)}); band "
                    f"{amount_display(reading.minimum, reading.currency)} to "
                    f"{amount_display(reading.maximum, reading.currency)}, target "
                    f"{amount_display(reading.target, reading.currency)} "
                    "(the thresholds as set now).",
                    labels=[bucket_label(s, window.width) for s in starts],
                    series=[charts.Series("balance", balances, RATE_COLOR)],
                    x_label="time (UTC)",
                    y_label=reading.currency,
                    bands=[charts.Band(float(reading.minimum), float(reading.maximum), "band")],
                    rules=[charts.Rule(float(reading.target), "target", RESOLVED_COLOR)],
                ),
            )
        )
    return found


def phase_timeline_chart(until: datetime) -> Chart:
    """The phases from the audit trail, the kill switch's time on below them, and the forced
    gates and read-percentage steps marked."""
    phases = history.phase_periods(until=until)
    start = phases[0].start if phases else until - timedelta(hours=1)
    kill = history.kill_switch_periods(until=until)
    markers = [
        charts.Marker(p.start, f"forced {p.state}", KILL_SWITCH_COLOR)
        for p in phases
        if p.action == AuditAction.FORCE
    ] + [
        charts.Marker(step.at, f"reads {step.evidence.get('read_percent_after')} %", "#444")
        for step in history.read_percent_steps()
    ]
    title = "Phase timeline"
    return Chart(
        "chart-timeline",
        title,
        charts.timeline_chart(
            chart_id="chart-timeline",
            title=title,
            desc="; ".join(
                f"{p.state} from {p.start:%Y-%m-%d %H:%M:%S} UTC ({p.action} by {p.actor}) "
                f"for {timesince(p.start, p.end)}"
                for p in phases
            )
            + (f"; the kill switch was on {len(kill)} times" if kill else ""),
            start=start,
            end=until,
            lanes=[
                charts.Lane(
                    "phase",
                    [
                        charts.Segment(
                            p.start,
                            p.end,
                            p.state,
                            PHASE_COLORS.get(p.state, "#757575"),
                            f"{p.state}: {p.action} by {p.actor} at {p.start:%Y-%m-%d %H:%M:%S}"
                            f" UTC, for {timesince(p.start, p.end)}"
                            + (f" ({p.reason})" if p.reason else ""),
                        )
                        for p in phases
                    ],
                ),
                charts.Lane(
                    "kill switch",
                    [
                        charts.Segment(
                            p.start,
                            p.end,
                            "on",
                            KILL_SWITCH_COLOR,
                            f"kill switch on by {p.actor} at {p.start:%Y-%m-%d %H:%M:%S} UTC "
                            f"for {timesince(p.start, p.end)}: {p.reason}",
                        )
                        for p in kill
                    ],
                ),
            ],
            markers=markers,
            x_label="time (UTC)",
        ),
    )


def rollout_charts(
    *, until: datetime, discrepancies: Window, writes: Window, buffers: Window
) -> list[Chart]:
    return [
        discrepancies_chart(discrepancies, until),
        write_success_chart(writes, until),
        experiment_chart(writes, until),
        *buffer_charts(buffers, until),
        phase_timeline_chart(until),
    ]


def cockpit_charts(*, now: datetime | None = None) -> list[Chart]:
    """The cockpit's charts: discrepancies per day over 14 days, the ledger writes and the
    shadow experiment per hour over 48 hours, the buffers every 6 hours over 7 days, every
    phase since the first."""
    now = now or timezone.now()
    hour = now.replace(minute=0, second=0, microsecond=0)
    day = hour.replace(hour=0)
    return rollout_charts(
        until=now,
        discrepancies=Window(day - timedelta(days=13), timedelta(days=1)),
        writes=Window(hour - timedelta(hours=47), timedelta(hours=1)),
        buffers=Window(day - timedelta(days=6), timedelta(hours=6)),
    )


def run_charts(*, since: datetime, until: datetime) -> list[Chart]:
    """The same charts over one run (a rehearsal), each cut into about 30 buckets."""
    window = Window(since, bucket_width_for(until - since))
    return rollout_charts(until=until, discrepancies=window, writes=window, buffers=window)
