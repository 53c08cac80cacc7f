#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
    from django.core.management import execute_from_command_line
    from django.db import OperationalError

    from config.env import ConfigurationError

    try:
        execute_from_command_line(sys.argv)
    except ConfigurationError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        sys.exit(2)
    except OperationalError as exc:  # the server is down or DATABASE_URL names the wrong one
        sys.stderr.write(f"database error (DATABASE_URL): {exc}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
