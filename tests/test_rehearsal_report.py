"""`rehearse --html PATH`: the report as one self-contained HTML document (tables and charts
inline, no address named). The full run that writes it is tests/test_commands.py's rehearsal,
which checks its file with `assert_self_contained_report`; here, the flag's errors, said before
a rehearsal is started."""

import re
import xml.etree.ElementTree as ET
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

RUN_CHARTS = [
    "chart-stage-latency",
    "chart-discrepancies",
    "chart-write-success",
    "chart-experiment",
    "chart-buffer-usd",
    "chart-buffer-usdc",
    "chart-timeline",
]


def table_rows(html: str, table_id: str) -> list[str]:
    table = re.search(rf'<table id="{table_id}">(.*?)</table>\s*(?:<|$)', html, re.S)
    assert table, f"no table {table_id}"
    body = table.group(1).split("<tbody>", 1)[1]
    return re.findall(r"^    <tr>(.*?)</tr>$", body, re.S | re.M)


def assert_self_contained_report(path: Path, report: dict) -> None:
    html = path.read_text(encoding="utf-8")
    # Nothing to fetch: no address at all, no script, stylesheet, image or frame to load.
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I)
    for loaded in ("<script", "<link", "<img", "<iframe", "<object", "@import", "url("):
        assert loaded not in html.lower(), loaded
    assert "<style>" in html
    verdict = "PASS" if report["ok"] else "FAIL"
    assert f'Verdict: <span class="{verdict.lower()}">{verdict}</span>' in html

    # The command's tables: a row per stage, per gate, per on-chain round, per invariant.
    assert len(table_rows(html, "stages")) == len(report["stages"])
    assert len(table_rows(html, "onchain")) == len(report["onchain"])
    invariants = table_rows(html, "invariants")
    assert len(invariants) == len(report["invariants"])
    assert all('class="pass">ok<' in row for row in invariants) == report["ok"]
    gates = html.split('<table id="gates">', 1)[1].split("<h2>", 1)[0]
    blocked = gates.split("<td>blocked</td>", 1)[1].split("</table>", 1)[0]
    assert re.search(
        r'<td>open_discrepancies</td><td class="not-met">not met</td><td>1</td>', blocked
    )

    # The charts, inline SVG: each an image with a title and a description.
    svgs = re.findall(r'<svg class="chart".*?</svg>', html, re.S)
    found = [ET.fromstring(svg) for svg in svgs]  # noqa: S314 - our own output
    assert [svg.get("id") for svg in found] == RUN_CHARTS
    for svg in found:
        assert svg.get("role") == "img" and svg.find("title").text and svg.find("desc").text
    # The shadow experiment's figures under its chart: every mutation applied in a dual-write
    # stage was timed in both stores (deposits and withdrawals through the balance path too).
    experiment = re.search(
        r'<table class="chart-table" id="table-experiment">(.*?)</table>', html, re.S
    )
    assert experiment, "no table of the shadow experiment"
    dual_writes = [
        int(re.findall(r"<td>(.*?)</td>", row)[1].replace(",", ""))
        for row in re.findall(r"<tr>(.*?)</tr>", experiment[1])[1:]
    ]
    applied = sum(
        s["applied"] for s in report["stages"] if s["phase"] in ("shadow", "read_switch", "strict")
    )
    assert sum(dual_writes) >= applied > 0
    latency = found[0]
    p50 = {
        bar.find("title").text
        for bar in latency.iter("rect")
        if bar.get("class") == "bar" and ": p50 " in bar.find("title").text
    }
    assert p50 == {f"{s['stage']}: p50 {s['p50_ms']:.1f}" for s in report["stages"]}
    phases = {
        seg.find("title").text.split(":")[0]
        for seg in found[-1].iter("rect")
        if seg.get("class") == "segment"
    }
    assert phases >= {"legacy", "shadow", "read_switch", "strict", "cutover"}


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing/report.html", "--html: cannot write into {tmp}/missing"),
        (".", "--html: {tmp} is a directory; name the file to write"),
    ],
)
def test_html_errors_name_the_flag_before_the_run(tmp_path, where, message):
    with pytest.raises(CommandError) as refused:
        call_command("rehearse", "--html", str(tmp_path / where), stdout=StringIO())
    assert str(refused.value) == message.format(tmp=tmp_path)
