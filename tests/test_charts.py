"""The cockpit's SVG charts (config/charts.py): known data lands where the axes say it should,
every mark names its figure, and each chart is an accessible image with labelled axes."""

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from config import charts
from config.charts import (
    PLOT_BOTTOM,
    PLOT_HEIGHT,
    PLOT_LEFT,
    PLOT_WIDTH,
    Band,
    Lane,
    Marker,
    RightAxis,
    Rule,
    Segment,
    Series,
)


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # noqa: S314 - our own output


def texts(root: ET.Element, css_class: str) -> list[str]:
    return [e.text for e in root.iter("text") if e.get("class") == css_class]


def of_class(root: ET.Element, tag: str, css_class: str) -> list[ET.Element]:
    return [e for e in root.iter(tag) if e.get("class") == css_class]


def test_nice_ceiling_gives_round_axis_tops():
    assert [charts.nice_ceiling(v) for v in (0, 3, 7, 10, 11, 26, 0.3, 4200)] == [
        1,
        5,
        10,
        10,
        20,
        50,
        0.5,
        5000,
    ]


def test_bar_chart_puts_each_bar_at_its_category_and_height():
    svg = charts.bar_chart(
        chart_id="d",
        title="Discrepancies per day",
        desc="3 days",
        labels=["12-01", "12-02", "12-03"],
        series=[Series("opened", [4, 0, 10], "#c00"), Series("resolved", [2, 5, None], "#0a0")],
        x_label="day (UTC)",
        y_label="discrepancies",
    )
    root = parse(svg)
    assert root.get("role") == "img" and root.get("aria-labelledby") == "d-title d-desc"
    assert root.find("title").text == "Discrepancies per day"
    assert root.find("desc").text == "3 days"
    assert texts(root, "axis-label x-label") == ["day (UTC)"]
    assert texts(root, "axis-label y-label") == ["discrepancies"]
    assert texts(root, "x-tick") == ["12-01", "12-02", "12-03"]
    assert texts(root, "y-tick") == ["0", "2", "4", "6", "8", "10"]  # top: 10, five steps

    bars = {e.find("title").text: e for e in of_class(root, "rect", "bar")}
    assert set(bars) == {  # the None is a missing bar, a 0 a bar of no height
        "12-01: opened 4",
        "12-02: opened 0",
        "12-03: opened 10",
        "12-01: resolved 2",
        "12-02: resolved 5",
    }
    group = PLOT_WIDTH / 3
    bar = group * 0.8 / 2
    tallest = bars["12-03: opened 10"]
    assert float(tallest.get("x")) == round(PLOT_LEFT + 2 * group + group * 0.1, 2)
    assert float(tallest.get("y")) == charts.PLOT_TOP  # 10 is the top of the axis
    assert float(tallest.get("height")) == PLOT_HEIGHT
    four = bars["12-01: opened 4"]
    assert float(four.get("height")) == round(PLOT_HEIGHT * 0.4, 2)
    assert float(four.get("y")) + float(four.get("height")) == pytest.approx(PLOT_BOTTOM)
    second_series = bars["12-02: resolved 5"]
    assert float(second_series.get("x")) == round(PLOT_LEFT + group + group * 0.1 + bar, 2)
    assert float(bars["12-02: opened 0"].get("height")) == 0
    legend = [g.find("text").text for g in of_class(root, "g", "legend-item")]
    assert legend == ["opened", "resolved"]


def test_line_chart_points_gaps_rules_and_bands():
    svg = charts.line_chart(
        chart_id="w",
        title="Ledger write success per hour",
        desc="4 hours",
        labels=["10:00", "11:00", "12:00", "13:00"],
        series=[Series("succeeded", [100.0, 99.5, None, 99.0], "#00c")],
        x_label="hour (UTC)",
        y_label="succeeded (%)",
        y_min=99.0,
        y_max=100.0,
        rules=[Rule(99.9, "gate minimum")],
        bands=[Band(99.2, 99.8, "band")],
    )
    root = parse(svg)
    points = {e.find("title").text: e for e in of_class(root, "circle", "point")}
    assert list(points) == ["10:00: succeeded 100", "11:00: succeeded 99.50", "13:00: succeeded 99"]
    step = PLOT_WIDTH / 4
    assert [float(p.get("cx")) for p in points.values()] == [
        round(PLOT_LEFT + 0.5 * step, 2),
        round(PLOT_LEFT + 1.5 * step, 2),
        round(PLOT_LEFT + 3.5 * step, 2),
    ]
    # 100 at the top, 99 at the bottom, 99.5 half-way
    assert [float(p.get("cy")) for p in points.values()] == [
        charts.PLOT_TOP,
        PLOT_BOTTOM - PLOT_HEIGHT / 2,
        PLOT_BOTTOM,
    ]
    # the missing hour breaks the line: one polyline through the first two points only (a
    # single point after the gap is drawn as its circle)
    lines = of_class(root, "polyline", "line")
    assert [line.get("points") for line in lines] == [
        f"{points['10:00: succeeded 100'].get('cx')},{charts.PLOT_TOP} "
        f"{points['11:00: succeeded 99.50'].get('cx')},{PLOT_BOTTOM - PLOT_HEIGHT / 2:g}"
    ]
    (rule,) = of_class(root, "line", "rule")
    assert float(rule.get("y1")) == round(PLOT_BOTTOM - 0.9 * PLOT_HEIGHT, 2)
    assert texts(root, "rule-label") == ["gate minimum 99.90"]
    (band,) = of_class(root, "rect", "band")
    assert float(band.get("y")) == round(PLOT_BOTTOM - 0.8 * PLOT_HEIGHT, 2)
    assert float(band.get("height")) == round(0.6 * PLOT_HEIGHT, 2)
    assert band.find("title").text == "band: 99.20 to 99.80"


def test_line_chart_axis_covers_values_bands_and_rules():
    root = parse(
        charts.line_chart(
            chart_id="b",
            title="usdc_buffer",
            desc="d",
            labels=["a", "b"],
            series=[Series("balance", [12000.0, 18000.0], "#00c")],
            x_label="time",
            y_label="USDC",
            bands=[Band(5000, 100000, "band")],
            rules=[Rule(20000, "target")],
        )
    )
    assert texts(root, "y-tick")[-1] == "100,000"  # the band's top is on the axis
    point = of_class(root, "circle", "point")[1]
    assert float(point.get("cy")) == round(PLOT_BOTTOM - 0.18 * PLOT_HEIGHT, 2)


def test_line_chart_with_bars_on_a_right_axis():
    """Times as lines on the left axis (a dashed one too), a rate as bars on the right one: each
    mark at its own axis's height, the chart wider by the right axis's room."""
    root = parse(
        charts.line_chart(
            chart_id="x",
            title="Legacy vs ledger",
            desc="d",
            labels=["10:00", "11:00"],
            series=[
                Series("legacy p50", [1.0, 2.0], "#b85c00"),
                Series("ledger p95", [4.0, None], "#1e63c4", "6 3"),
            ],
            x_label="time",
            y_label="ms",
            right=RightAxis(
                "mismatched (%)",
                [Series("mismatch rate", [25.0, None], "#e99")],
                fmt=lambda v: f"{v:g} %",
            ),
        )
    )
    assert root.get("width") == str(charts.WIDTH + charts.RIGHT_AXIS_ROOM)
    assert texts(root, "y-tick") == ["0", "1", "2", "3", "4", "5"]  # left: up to 5 ms
    assert texts(root, "right-tick") == ["0 %", "5 %", "10 %", "15 %", "20 %", "25 %"]
    assert texts(root, "axis-label right-label") == ["mismatched (%)"]
    (bar,) = of_class(root, "rect", "bar")  # the None is no bar
    assert bar.find("title").text == "10:00: mismatch rate 25 %"
    assert float(bar.get("y")) == charts.PLOT_TOP  # 25 % is the right axis's top
    points = {e.find("title").text: e for e in of_class(root, "circle", "point")}
    assert float(points["11:00: legacy p50 2"].get("cy")) == PLOT_BOTTOM - 0.4 * PLOT_HEIGHT
    assert float(points["10:00: ledger p95 4"].get("cy")) == PLOT_BOTTOM - 0.8 * PLOT_HEIGHT
    (solid,) = of_class(root, "polyline", "line")  # a line of one point is its point alone
    assert solid.get("stroke-dasharray") is None
    legend = [g.find("text").text for g in of_class(root, "g", "legend-item")]
    assert legend == ["legacy p50", "ledger p95", "mismatch rate"]


def test_line_chart_draws_a_dashed_series_dashed():
    root = parse(
        charts.line_chart(
            chart_id="y",
            title="t",
            desc="d",
            labels=["a", "b"],
            series=[Series("p95", [1.0, 2.0], "#00c", "6 3")],
            x_label="x",
            y_label="y",
        )
    )
    (line,) = of_class(root, "polyline", "line")
    assert line.get("stroke-dasharray") == "6 3"
    assert root.get("width") == str(charts.WIDTH)


def test_timeline_segments_span_their_time_and_markers_stand_at_theirs():
    start = datetime(2026, 12, 1, tzinfo=UTC)
    end = start + timedelta(days=4)
    svg = charts.timeline_chart(
        chart_id="t",
        title="Phase timeline",
        desc="legacy then shadow",
        start=start,
        end=end,
        lanes=[
            Lane(
                "phase",
                [
                    Segment(start, start + timedelta(days=1), "legacy", "#777"),
                    Segment(start + timedelta(days=1), end, "shadow", "#16c", "shadow: advance"),
                ],
            ),
            Lane(
                "kill switch",
                [
                    Segment(
                        start + timedelta(days=2),
                        start + timedelta(days=3),
                        "on",
                        "#c00",
                        "kill switch on by admin:op",
                    )
                ],
            ),
        ],
        markers=[
            Marker(start + timedelta(days=1), "forced shadow"),
            Marker(start + timedelta(days=3), "reads 50 %"),
            Marker(start + timedelta(days=3, minutes=5), "reads 100 %"),  # too close: stacked
        ],
        x_label="time (UTC)",
    )
    root = parse(svg)
    segments = {e.find("title").text: e for e in of_class(root, "rect", "segment")}
    quarter = PLOT_WIDTH / 4
    assert float(segments["legacy"].get("x")) == PLOT_LEFT
    assert float(segments["legacy"].get("width")) == quarter
    assert float(segments["shadow: advance"].get("x")) == PLOT_LEFT + quarter
    assert float(segments["shadow: advance"].get("width")) == 3 * quarter
    kill = segments["kill switch on by admin:op"]
    assert float(kill.get("x")) == PLOT_LEFT + 2 * quarter
    assert float(kill.get("y")) > float(segments["legacy"].get("y"))  # its own lane, below
    assert texts(root, "lane-name") == ["phase", "kill switch"]
    assert "shadow" in texts(root, "segment-label")
    forced, fifty, hundred = of_class(root, "g", "marker")
    assert float(forced.find("line").get("x1")) == PLOT_LEFT + quarter
    assert forced.find("text").text == "forced shadow"
    label_rows = [float(m.find("text").get("y")) for m in (forced, fifty, hundred)]
    assert label_rows[0] == label_rows[1] == label_rows[2] - charts.MARKER_ROW
    assert float(root.get("height")) >= label_rows[2] + 14  # the stacked label is inside
    assert texts(root, "x-tick")[0] == "12-01 00:00" and texts(root, "x-tick")[-1] == "12-05 00:00"


def test_labels_are_escaped_and_no_address_is_named():
    svg = charts.bar_chart(
        chart_id="e",
        title="<script>alert(1)</script> & co",
        desc="d",
        labels=["a<b"],
        series=[Series('x"y', [1], "#000")],
        x_label="x",
        y_label="y",
    )
    root = parse(svg)  # still well-formed XML
    assert root.find("title").text == "<script>alert(1)</script> & co"
    assert "<script>" not in svg
    assert "http" not in svg  # no namespace URL, no link: it travels inside a report


def test_labels_too_wide_to_stand_side_by_side_alternate_lines():
    labels = ["read_switch 10%", "read_switch 50%", "strict", "cutover"]
    wide = parse(
        charts.bar_chart(
            chart_id="s",
            title="t",
            desc="d",
            labels=labels * 2,
            series=[Series("p50", [1.0] * 8, "#000")],
            x_label="stage",
            y_label="ms",
        )
    )
    ticks = [e for e in wide.iter("text") if e.get("class") == "x-tick"]
    assert [float(t.get("y")) for t in ticks[:3]] == [
        PLOT_BOTTOM + 16,
        PLOT_BOTTOM + 30,
        PLOT_BOTTOM + 16,
    ]
    narrow = parse(
        charts.bar_chart(
            chart_id="n",
            title="t",
            desc="d",
            labels=["a", "b"],
            series=[Series("p50", [1.0, 2.0], "#000")],
            x_label="stage",
            y_label="ms",
        )
    )
    assert {e.get("y") for e in narrow.iter("text") if e.get("class") == "x-tick"} == {
        str(PLOT_BOTTOM + 16)
    }
