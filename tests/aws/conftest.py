"""The checklist's AWS commands, read from its text (the expectations of tests/aws/ and of the
checklist's walk; the moto server and the `aws` fixture are in tests/conftest.py)."""

import re
from pathlib import Path

CHECKLIST = Path(__file__).resolve().parents[2] / "deploy/checklist/ledger-deployment-checklist.md"


def checklist_commands(command: str) -> list[dict[str, str]]:
    """Each `aws <command>` of the checklist (deploy/checklist/, the seed's copy) as its flags:
    `{"alarm-name": "...", "period": "300", ...}`."""
    found = re.findall(
        rf"aws {command}((?:[ \t]*\\?\n?[ \t]*--[\w-]+ [^\s\\]+)+)", CHECKLIST.read_text()
    )
    return [dict(re.findall(r"--([\w-]+) ([^\s\\]+)", flags)) for flags in found]
