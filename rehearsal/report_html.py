"""`rehearse --html PATH`: the rehearsal's report as one self-contained HTML document an operator
can attach to a change request: the tables the command prints (stages, gates with their
evidence, deposits and withdrawals, invariants) and the cockpit's charts over the run, plus the
balance mutations' latency per stage (legacy only, both stores, ledger only: the shadow
experiment's timings, measured by the rehearsal's traffic). Styles are inline and the charts are
SVG drawn in Python: the file names no address, so it reads the same offline and years later."""

from datetime import datetime
from decimal import Decimal

from django.template.loader import render_to_string

from config import charts
from config.cockpit_charts import Chart

LATENCIES = (
    ("p50_ms", "p50", "#7fa7e0"),
    ("p95_ms", "p95", "#1e63c4"),
    ("p99_ms", "p99", "#0d2f66"),
)


def stage_latency_chart(report: dict) -> Chart:
    """The latency of a balance mutation per stage, as the traffic's workers measured it."""
    stages = report["stages"]
    title = "Balance mutation latency per stage"
    first, last = stages[0], stages[-1]
    return Chart(
        "chart-stage-latency",
        title,
        charts.bar_chart(
            chart_id="chart-stage-latency",
            title=title,
            desc=f"p50, p95 and p99 in milliseconds of each stage's balance mutations: "
            f"{first['stage']} (legacy only) p50 {first['p50_ms']:.1f} ms, p99 "
            f"{first['p99_ms']:.1f} ms; {last['stage']} (ledger only) p50 {last['p50_ms']:.1f} "
            f"ms, p99 {last['p99_ms']:.1f} ms; the stages between write both stores.",
            labels=[s["stage"] for s in stages],
            series=[
                charts.Series(name, [s[key] for s in stages], color)
                for key, name, color in LATENCIES
            ],
            x_label="stage (phase)",
            y_label="milliseconds",
            fmt=lambda v: f"{v:.1f}",
        ),
    )


def _gate_rows(report: dict) -> list[dict]:
    rows = []
    for gate in report["gates"]:
        evidence = gate["evidence"]
        notes = []
        if "proof" in evidence:
            notes.append(f"equality proof: {evidence['proof']['actual']}")
        if "read_percent_after" in evidence:
            notes.append(
                f"reads from the ledger: {evidence['read_percent_before']} % -> "
                f"{evidence['read_percent_after']} % of users"
            )
        if "legacy_rows_rebuilt" in evidence:
            notes.append(f"legacy rows rebuilt from the ledger: {evidence['legacy_rows_rebuilt']}")
        rows.append(
            {
                "transition": gate["transition"],
                "result": gate["result"],
                "checks": evidence.get("checks", []),
                "notes": notes,
            }
        )
    return rows


def _onchain_rows(report: dict) -> list[dict]:
    return [
        {
            **row,
            "withdrawals_outcome": f"{row['completed']}/{row['refused_by_circle']}/"
            f"{row['failed_on_chain']}",
            "in": f"{Decimal(row['deposited']):,.2f}",
            "out": f"{Decimal(row['withdrawn']):,.2f}",
            "buffer": f"{Decimal(row['buffer_change']):+,.2f}",
        }
        for row in report["onchain"]
    ]


def _summary(report: dict) -> list[str]:
    treasury = report["treasury"]
    t = {k: Decimal(v) for k, v in treasury.items() if isinstance(v, str)}
    pre = report["pre_shadow_withdrawal"]
    return [
        f"Treasury: withdrawals took the USDC buffer from {t['buffer_before']:,.2f} to "
        f"{t['buffer_low']:,.2f} (minimum {t['minimum']:,.0f}); the settlement cycle's job "
        f"({'; '.join(treasury['jobs']) or 'none'}) brought it to {t['buffer_after']:,.2f} "
        f"(target {t['target']:,.0f}).",
        f"Pre-shadow money: {Decimal(pre['amount']):,.2f} USDC requested and sent in "
        f"{pre['requested_in']}, {pre['status']} in {pre['completed_in']}.",
        "Custody at the end: "
        + "; ".join(
            f"{r['currency']} ledger {Decimal(r['ledger']):,.2f}, {r['source']} "
            f"{Decimal(r['reported']):,.2f}"
            for r in report["custody_reconciled"]
        )
        + ".",
    ]


def report_html(*, report: dict, run_charts: list[Chart], generated_at: datetime) -> str:
    return render_to_string(
        "rehearsal/report.html",
        {
            "report": report,
            "generated_at": generated_at,
            "gates": _gate_rows(report),
            "onchain": _onchain_rows(report),
            "summary": _summary(report),
            "charts": [stage_latency_chart(report), *run_charts],
        },
    )
