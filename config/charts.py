"""Charts as SVG drawn here, in Python: they work offline (no script, no CDN), print, and travel
inside a self-contained HTML file (`rehearse --html`). Each chart is an image with a title and a
description for screen readers (`role="img"`, `<title>`, `<desc>`), labelled axes, a legend, and
a `<title>` on every bar, point and segment saying its exact figure. The SVG carries no
namespace URL: inline in HTML it needs none, and the report then names no address at all.

The plot area is the same in every chart (PLOT_*), so a value's position is predictable: a
category i of n has its centre at PLOT_LEFT + (i + 0.5) * PLOT_WIDTH / n; a value v on an axis
from lo to hi sits at PLOT_BOTTOM - (v - lo) / (hi - lo) * PLOT_HEIGHT. A chart with a second
y axis (`RightAxis`) is RIGHT_AXIS_ROOM wider, for that axis's ticks and label."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape

from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT = 720, 260
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 72, 688, 40, 208
PLOT_WIDTH, PLOT_HEIGHT = PLOT_RIGHT - PLOT_LEFT, PLOT_BOTTOM - PLOT_TOP
RIGHT_AXIS_ROOM = 56
Y_TICKS = 5
MAX_X_LABELS = 8
CHAR_WIDTH = 6.5  # about, at FONT's size: what a label needs to stand clear of its neighbours
LANE_HEIGHT = 30
FONT = 'font-family="sans-serif" font-size="11"'
AXIS = "#555"
GRID = "#ddd"


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]  # one per label; None is a gap (nothing measured)
    color: str
    dash: str = ""  # a line's stroke-dasharray ("6 3"); solid without


@dataclass(frozen=True)
class Rule:
    """A horizontal line across the plot at `value` (a threshold, a target)."""

    value: float
    label: str
    color: str = "#444"


@dataclass(frozen=True)
class Band:
    """A shaded range of the y axis (a buffer's band, minimum to maximum)."""

    low: float
    high: float
    label: str
    color: str = "#2e7d32"


def _plain(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


@dataclass(frozen=True)
class RightAxis:
    """A second y axis, on the right, from 0 to `top` (default: a round top above every
    value): its series are drawn as bars under the lines of the left axis (a rate beside
    times)."""

    label: str
    series: Sequence[Series]
    fmt: Callable[[float], str] = _plain
    top: float | None = None


@dataclass(frozen=True)
class Segment:
    start: datetime
    end: datetime
    label: str
    color: str
    tooltip: str = ""


@dataclass(frozen=True)
class Lane:
    name: str
    segments: list[Segment] = field(default_factory=list)


@dataclass(frozen=True)
class Marker:
    at: datetime
    label: str
    color: str = "#444"


def _n(value: float) -> str:
    """A coordinate as written in the SVG: two decimals at most, no trailing zeros."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `value` (1 for nothing
    above 0): an axis top whose five ticks are round numbers."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for mantissa in (1, 2, 2.5, 5, 10):
        top = mantissa * 10.0**exponent
        if top >= value * (1 - 1e-12):
            return top
    return 10.0 ** (exponent + 1)


def y_position(value: float, low: float, high: float) -> float:
    return PLOT_BOTTOM - (value - low) / (high - low) * PLOT_HEIGHT


def category_centre(index: int, count: int) -> float:
    return PLOT_LEFT + (index + 0.5) * PLOT_WIDTH / count


def time_position(moment: datetime, start: datetime, end: datetime) -> float:
    span = (end - start).total_seconds() or 1.0
    return PLOT_LEFT + (moment - start).total_seconds() / span * PLOT_WIDTH


def _open(
    chart_id: str, title: str, desc: str, height: int = HEIGHT, width: int = WIDTH
) -> list[str]:
    return [
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" '
        f'aria-labelledby="{escape(chart_id)}-title {escape(chart_id)}-desc" {FONT}>',
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
        f'<desc id="{escape(chart_id)}-desc">{escape(desc)}</desc>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
        f'<text class="chart-title" x="{PLOT_LEFT}" y="18" font-size="13" '
        f'font-weight="bold" fill="#222">{escape(title)}</text>',
    ]


def _legend(items: list[tuple[str, str]]) -> list[str]:
    """The series' names and colours, right-aligned above the plot, in reading order."""
    parts, x = [], PLOT_RIGHT
    for name, color in reversed(items):
        x -= CHAR_WIDTH * len(name) + 22
        parts.append(
            f'<g class="legend-item"><rect x="{_n(x)}" y="24" width="10" height="10" '
            f'fill="{color}"/><text x="{_n(x + 14)}" y="33" fill="#222">{escape(name)}</text></g>'
        )
    return parts[::-1]


def _y_axis(low: float, high: float, label: str, fmt: Callable[[float], str]) -> list[str]:
    parts = [
        f'<line class="y-axis" x1="{PLOT_LEFT}" y1="{PLOT_TOP}" x2="{PLOT_LEFT}" '
        f'y2="{PLOT_BOTTOM}" stroke="{AXIS}"/>',
        f'<text class="axis-label y-label" '
        f'transform="translate(14 {_n(PLOT_TOP + PLOT_HEIGHT / 2)}) rotate(-90)" '
        f'text-anchor="middle" fill="#222">{escape(label)}</text>',
    ]
    for tick in range(Y_TICKS + 1):
        value = low + (high - low) * tick / Y_TICKS
        y = _n(y_position(value, low, high))
        parts.append(
            f'<line class="grid" x1="{PLOT_LEFT}" y1="{y}" x2="{PLOT_RIGHT}" y2="{y}" '
            f'stroke="{GRID}"/>'
            f'<text class="y-tick" x="{PLOT_LEFT - 6}" y="{y}" dy="4" text-anchor="end" '
            f'fill="{AXIS}">{escape(fmt(value))}</text>'
        )
    return parts


def _right_axis(top: float, label: str, fmt: Callable[[float], str]) -> list[str]:
    """A second y axis at the plot's right edge, from 0 to `top`, its ticks beside the left
    axis's grid lines (the same five steps)."""
    parts = [
        f'<line class="right-axis" x1="{PLOT_RIGHT}" y1="{PLOT_TOP}" x2="{PLOT_RIGHT}" '
        f'y2="{PLOT_BOTTOM}" stroke="{AXIS}"/>',
        f'<text class="axis-label right-label" '
        f'transform="translate({WIDTH + RIGHT_AXIS_ROOM - 10} '
        f'{_n(PLOT_TOP + PLOT_HEIGHT / 2)}) rotate(90)" '
        f'text-anchor="middle" fill="#222">{escape(label)}</text>',
    ]
    for tick in range(Y_TICKS + 1):
        value = top * tick / Y_TICKS
        parts.append(
            f'<text class="right-tick" x="{PLOT_RIGHT + 6}" y="{_n(y_position(value, 0, top))}" '
            f'dy="4" fill="{AXIS}">{escape(fmt(value))}</text>'
        )
    return parts


def _x_axis(labels: Sequence[str], label: str) -> list[str]:
    """Category labels under the plot, at most MAX_X_LABELS of them; every other one a line
    lower when they are too wide to stand side by side."""
    parts = [
        f'<line class="x-axis" x1="{PLOT_LEFT}" y1="{PLOT_BOTTOM}" x2="{PLOT_RIGHT}" '
        f'y2="{PLOT_BOTTOM}" stroke="{AXIS}"/>',
        f'<text class="axis-label x-label" x="{_n(PLOT_LEFT + PLOT_WIDTH / 2)}" '
        f'y="{HEIGHT - 8}" text-anchor="middle" fill="#222">{escape(label)}</text>',
    ]
    every = max(1, math.ceil(len(labels) / MAX_X_LABELS))
    room = PLOT_WIDTH / max(len(labels), 1) * every
    stagger = max((len(t) for t in labels), default=0) * CHAR_WIDTH > room
    for index, text in enumerate(labels):
        if index % every:
            continue
        lower = 14 if stagger and (index // every) % 2 else 0
        parts.append(
            f'<text class="x-tick" x="{_n(category_centre(index, len(labels)))}" '
            f'y="{PLOT_BOTTOM + 16 + lower}" text-anchor="middle" fill="{AXIS}">'
            f"{escape(text)}</text>"
        )
    return parts


def _bars(
    series: Sequence[Series], labels: Sequence[str], top: float, fmt: Callable[[float], str]
) -> list[str]:
    """Grouped bars from 0 up to an axis whose top is `top`: one group per label, one bar per
    series (a None is no bar)."""
    parts = []
    group = PLOT_WIDTH / max(len(labels), 1)
    bar = group * 0.8 / max(len(series), 1)
    for j, one in enumerate(series):
        parts.append(f'<g class="series" data-series="{escape(one.name)}">')
        for i, value in enumerate(one.values):
            if value is None:
                continue
            x = PLOT_LEFT + i * group + group * 0.1 + j * bar
            y = y_position(value, 0, top)
            parts.append(
                f'<rect class="bar" x="{_n(x)}" y="{_n(y)}" width="{_n(bar)}" '
                f'height="{_n(PLOT_BOTTOM - y)}" fill="{one.color}">'
                f"<title>{escape(labels[i])}: {escape(one.name)} {escape(fmt(value))}</title>"
                "</rect>"
            )
        parts.append("</g>")
    return parts


def bar_chart(
    *,
    chart_id: str,
    title: str,
    desc: str,
    labels: Sequence[str],
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    fmt: Callable[[float], str] = _plain,
    counts: bool = False,
) -> SafeString:
    """Grouped bars: one group per label, one bar per series, from 0 up to a round top (for
    `counts`, at least Y_TICKS, so that every tick is a whole number)."""
    top = nice_ceiling(max((v for s in series for v in s.values if v is not None), default=0))
    if counts:
        top = max(top, Y_TICKS)
    parts = _open(chart_id, title, desc)
    parts += _y_axis(0, top, y_label, fmt)
    parts += _x_axis(labels, x_label)
    parts += _bars(series, labels, top, fmt)
    parts += _legend([(s.name, s.color) for s in series])
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every text above went through escape()


def line_chart(
    *,
    chart_id: str,
    title: str,
    desc: str,
    labels: Sequence[str],
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    y_min: float = 0.0,
    y_max: float | None = None,
    rules: Sequence[Rule] = (),
    bands: Sequence[Band] = (),
    fmt: Callable[[float], str] = _plain,
    right: RightAxis | None = None,
) -> SafeString:
    """Lines through each series' points (a None breaks the line), over optional shaded bands,
    horizontal rules and the bars of a second axis on the right; the y axis from `y_min` to
    `y_max` (default: a round top above every value, rule and band)."""
    values = [v for s in series for v in s.values if v is not None]
    values += [r.value for r in rules] + [b.high for b in bands]
    top = y_max if y_max is not None else nice_ceiling(max(values, default=0) - y_min) + y_min
    parts = _open(chart_id, title, desc, width=WIDTH + (RIGHT_AXIS_ROOM if right else 0))
    for band in bands:
        high, low = y_position(min(band.high, top), y_min, top), y_position(band.low, y_min, top)
        parts.append(
            f'<rect class="band" x="{PLOT_LEFT}" y="{_n(high)}" width="{PLOT_WIDTH}" '
            f'height="{_n(low - high)}" fill="{band.color}" fill-opacity="0.12">'
            f"<title>{escape(band.label)}: {escape(fmt(band.low))} to "
            f"{escape(fmt(band.high))}</title></rect>"
        )
    parts += _y_axis(y_min, top, y_label, fmt)
    parts += _x_axis(labels, x_label)
    if right:
        right_top = right.top or nice_ceiling(
            max((v for s in right.series for v in s.values if v is not None), default=0)
        )
        parts += _right_axis(right_top, right.label, right.fmt)
        parts += _bars(right.series, labels, right_top, right.fmt)
    for rule in rules:
        y = _n(y_position(rule.value, y_min, top))
        parts.append(
            f'<line class="rule" x1="{PLOT_LEFT}" y1="{y}" x2="{PLOT_RIGHT}" y2="{y}" '
            f'stroke="{rule.color}" stroke-dasharray="6 4"><title>{escape(rule.label)} '
            f"{escape(fmt(rule.value))}</title></line>"
            f'<text class="rule-label" x="{PLOT_LEFT + 4}" y="{y}" dy="-4" '
            f'fill="{rule.color}">{escape(rule.label)} {escape(fmt(rule.value))}</text>'
        )
    count = max(len(labels), 1)
    for one in series:
        parts.append(f'<g class="series" data-series="{escape(one.name)}">')
        run: list[str] = []
        points: list[str] = []
        for i, value in enumerate([*one.values, None]):
            if value is None:
                if len(run) > 1:
                    parts.append(
                        f'<polyline class="line" points="{" ".join(run)}" fill="none" '
                        f'stroke="{one.color}" stroke-width="2"'
                        + (f' stroke-dasharray="{one.dash}"/>' if one.dash else "/>")
                    )
                run = []
                continue
            x, y = _n(category_centre(i, count)), _n(y_position(value, y_min, top))
            run.append(f"{x},{y}")
            points.append(
                f'<circle class="point" cx="{x}" cy="{y}" r="3" fill="{one.color}">'
                f"<title>{escape(labels[i])}: {escape(one.name)} {escape(fmt(value))}</title>"
                "</circle>"
            )
        parts += points
        parts.append("</g>")
    legend = [(s.name, s.color) for s in series] + [(b.label, b.color) for b in bands]
    legend += [(s.name, s.color) for s in right.series] if right else []
    parts += _legend(legend)
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every text above went through escape()


def time_label(moment: datetime, span: timedelta) -> str:
    """A moment as precisely as a span of this length needs."""
    if span >= timedelta(days=2):
        return f"{moment:%m-%d %H:%M}"
    if span >= timedelta(minutes=10):
        return f"{moment:%H:%M}"
    return f"{moment:%H:%M:%S}"


MARKER_ROW = 14


def _marker_rows(markers: Sequence[Marker], start: datetime, end: datetime) -> list[int]:
    """The text row of each marker's label (in the order given): from left to right, the first
    row where it does not run into a label already there, so that markers close in time (the
    read-percentage steps) stack up instead of overprinting."""
    ends: list[float] = []  # per row, where its rightmost label ends
    rows = [0] * len(markers)
    for index in sorted(range(len(markers)), key=lambda i: markers[i].at):
        half = len(markers[index].label) * CHAR_WIDTH / 2
        x = time_position(markers[index].at, start, end)
        row = next((r for r, right in enumerate(ends) if right + 4 <= x - half), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = x + half
        rows[index] = row
    return rows


def timeline_chart(
    *,
    chart_id: str,
    title: str,
    desc: str,
    start: datetime,
    end: datetime,
    lanes: Sequence[Lane],
    markers: Sequence[Marker] = (),
    x_label: str,
) -> SafeString:
    """Lanes of time segments (a phase, the kill switch on) from `start` to `end`, with
    labelled markers (a forced gate, a read-percentage step) below the last lane."""
    top = PLOT_TOP + 4
    marker_rows = _marker_rows(markers, start, end)
    height = top + LANE_HEIGHT * len(lanes) + 60 + MARKER_ROW * (max(marker_rows, default=-1) + 1)
    parts = _open(chart_id, title, desc, height)
    bottom = top + LANE_HEIGHT * len(lanes)
    for row, lane in enumerate(lanes):
        y = top + row * LANE_HEIGHT
        parts.append(
            f'<text class="lane-name" x="{PLOT_LEFT - 6}" y="{y + LANE_HEIGHT / 2:.0f}" dy="4" '
            f'text-anchor="end" fill="#222">{escape(lane.name)}</text>'
        )
        parts.append(f'<g class="lane" data-lane="{escape(lane.name)}">')
        for segment in lane.segments:
            x0 = time_position(max(segment.start, start), start, end)
            x1 = time_position(min(segment.end, end), start, end)
            parts.append(
                f'<rect class="segment" x="{_n(x0)}" y="{y + 3}" width="{_n(max(x1 - x0, 1))}" '
                f'height="{LANE_HEIGHT - 6}" fill="{segment.color}">'
                f"<title>{escape(segment.tooltip or segment.label)}</title></rect>"
            )
            if x1 - x0 >= CHAR_WIDTH * len(segment.label) + 8:
                parts.append(
                    f'<text class="segment-label" x="{_n(x0 + 4)}" y="{y + LANE_HEIGHT / 2:.0f}" '
                    f'dy="4" fill="#fff">{escape(segment.label)}</text>'
                )
        parts.append("</g>")
    span = end - start
    parts.append(
        f'<line class="x-axis" x1="{PLOT_LEFT}" y1="{bottom}" x2="{PLOT_RIGHT}" y2="{bottom}" '
        f'stroke="{AXIS}"/>'
    )
    for tick in range(Y_TICKS + 1):
        moment = start + span * tick / Y_TICKS
        x = _n(time_position(moment, start, end))
        parts.append(
            f'<line x1="{x}" y1="{bottom}" x2="{x}" y2="{bottom + 4}" stroke="{AXIS}"/>'
            f'<text class="x-tick" x="{x}" y="{bottom + 16}" text-anchor="middle" '
            f'fill="{AXIS}">{escape(time_label(moment, span))}</text>'
        )
    for marker, row in zip(markers, marker_rows, strict=True):
        x = _n(time_position(marker.at, start, end))
        parts.append(
            f'<g class="marker"><line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" '
            f'stroke="{marker.color}" stroke-width="2" stroke-dasharray="3 2"/>'
            f'<text x="{x}" y="{bottom + 30 + MARKER_ROW * row}" text-anchor="middle" '
            f'fill="{marker.color}">{escape(marker.label)}</text><title>{escape(marker.label)} '
            f"at {marker.at:%Y-%m-%d %H:%M:%S} UTC</title></g>"
        )
    parts.append(
        f'<text class="axis-label x-label" x="{_n(PLOT_LEFT + PLOT_WIDTH / 2)}" '
        f'y="{height - 6}" text-anchor="middle" fill="#222">{escape(x_label)}</text>'
    )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every text above went through escape()
