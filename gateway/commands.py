"""Argument types the management commands of every layer share (the operators' edge)."""


def positive_int(value: str) -> int:
    """argparse type for counts: a whole number of at least 1."""
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number
