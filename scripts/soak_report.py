"""scripts/soak's report: one line per check (what ran, how many, what failed) from each
pytest run's JUnit XML and output, written as Markdown to the path given; the path printed.

Usage: soak_report.py RUNS_DIR REPORT_PATH (RUNS_DIR holds checks.tsv, <check>.xml and
<check>.log, as scripts/soak leaves them)."""

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

MODEL_FIGURES = re.compile(r"^money model: (\{.*\})$", re.MULTILINE)


def junit(path: Path) -> dict:
    """Counts, seconds, the failed tests with their first line, and every numeric property the
    tests recorded (record_property), added up by name."""
    found = {"tests": 0, "failed": [], "skipped": 0, "properties": {}}
    if not path.exists():
        return found
    cases = ET.parse(path).getroot().iter("testcase")  # noqa: S314 (our own pytest's XML)
    for case in cases:
        found["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for outcome in ("failure", "error"):
            problem = case.find(outcome)
            if problem is not None:
                first = (problem.get("message") or problem.text or "").strip().splitlines()
                found["failed"].append(f"{name} ({outcome}: {first[0][:300] if first else ''})")
        if case.find("skipped") is not None:
            found["skipped"] += 1
        for prop in case.iter("property"):
            try:
                value = int(prop.get("value", ""))
            except ValueError:
                continue
            found["properties"][prop.get("name")] = found["properties"].get(prop.get("name"), 0)
            found["properties"][prop.get("name")] += value
    return found


def how_many(size: str, result: dict, log: str) -> str:
    parts = [size, f"{result['tests']} test{'' if result['tests'] == 1 else 's'}"]
    parts += [f"{name.replace('_', ' ')} {value:,}" for name, value in result["properties"].items()]
    figures = MODEL_FIGURES.search(log)
    if figures:
        parts += [f"{name} {value}" for name, value in json.loads(figures.group(1)).items()]
    return "; ".join(parts)


def main(runs: Path, report: Path) -> None:
    rows, details = [], []
    for line in (runs / "checks.tsv").read_text().splitlines():
        name, what, size, code, seconds = line.split("\t")
        if code == "absent":
            rows.append(f"| {name} | {what} | {size} | not run: not in this tree | - | - |")
            continue
        result = junit(runs / f"{name}.xml")
        log_path = runs / f"{name}.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        if code != "0" and not result["failed"]:  # pytest stopped before any test ended
            tail = log.strip().splitlines()[-1:] or ["no output"]
            result["failed"].append(f"pytest exited {code}: {tail[0][:300]}")
        failed = len(result["failed"])
        outcome = "passed" if code == "0" else f"FAILED ({failed})"
        named = "; ".join(result["failed"][:3]) + (" ..." if failed > 3 else "") or "none"
        rows.append(
            f"| {name} | {what} | {how_many(size, result, log)} | {outcome} | "
            f"{named.replace('|', '/')} | {seconds} |"
        )
        details += [f"- {name}: {failure}" for failure in result["failed"]]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 (git from PATH, as for a person)
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    text = [
        "# Soak report",
        "",
        f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit {commit or 'unknown'}; "
        f"each check's output and JUnit XML are in {runs}.",
        "",
        "| check | what ran | how many | result | what failed | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if details:
        text += ["", "## Failures", "", *details]
    report.write_text("\n".join(text) + "\n")
    print(f"soak: report written to {report}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
