"""The rollout phases and the seed's feature flags that express them (seed 001, Phase 4).

Pure data, importable by settings: a combination of flags that matches no phase is refused.
"""

from enum import StrEnum


class Phase(StrEnum):
    LEGACY = "legacy"
    SHADOW = "shadow"
    READ_SWITCH = "read_switch"
    STRICT = "strict"
    CUTOVER = "cutover"


ORDER = [Phase.LEGACY, Phase.SHADOW, Phase.READ_SWITCH, Phase.STRICT, Phase.CUTOVER]

# USE_LEDGER_INTEGRATION, LEDGER_SHADOW_MODE, LEDGER_STRICT_MODE, BALANCE_SOURCE,
# USE_ENHANCED_BALANCE_SERVICE, as seed 001 sets them in each step.
FLAG_NAMES = (
    "USE_LEDGER_INTEGRATION",
    "LEDGER_SHADOW_MODE",
    "LEDGER_STRICT_MODE",
    "BALANCE_SOURCE",
    "USE_ENHANCED_BALANCE_SERVICE",
)
FLAGS: dict[Phase, tuple[bool, bool, bool, str, bool]] = {
    Phase.LEGACY: (False, False, False, "legacy", False),
    Phase.SHADOW: (True, True, False, "legacy", False),
    Phase.READ_SWITCH: (True, True, False, "ledger", True),
    Phase.STRICT: (True, True, True, "ledger", True),
    Phase.CUTOVER: (True, False, True, "ledger", True),
}

# Phases where both stores are written and must agree (the routing itself is in
# cutover_balance_mutate, cutover/sql/cutover.sql).
DUAL_WRITE = {Phase.SHADOW, Phase.READ_SWITCH, Phase.STRICT}


class UnknownFlagCombination(ValueError):
    pass


def phase_from_flags(values: tuple[bool, bool, bool, str, bool]) -> Phase:
    for phase, flags in FLAGS.items():
        if flags == values:
            return phase
    described = ", ".join(f"{name}={value}" for name, value in zip(FLAG_NAMES, values, strict=True))
    raise UnknownFlagCombination(f"{', '.join(FLAG_NAMES)}: {described} matches no phase")


def flags_of(phase: Phase) -> dict[str, bool | str]:
    return dict(zip(FLAG_NAMES, FLAGS[phase], strict=True))


def next_phase(phase: Phase) -> Phase | None:
    index = ORDER.index(phase)
    return ORDER[index + 1] if index + 1 < len(ORDER) else None
