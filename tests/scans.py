"""Sequential scans counted by this connection's backend, for the tests that a statement reads by
index. PostgreSQL reports a backend's counts at most once a second, between transactions, and
until then pg_stat_xact_user_tables still shows counts of earlier transactions (a test's set-up,
an earlier test's): read it at the start and at the end of one transaction, and compare."""

from django.db import connection


def sequential_scans(*tables: str) -> dict[str, int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.name, coalesce(s.seq_scan, 0) FROM unnest(%s::text[]) AS t(name) "
            "LEFT JOIN pg_stat_xact_user_tables s ON s.relname = t.name",
            [list(tables)],
        )
        return dict(cursor.fetchall())


def sequential_scans_since(before: dict[str, int]) -> dict[str, int]:
    after = sequential_scans(*before)
    return {name: after[name] - count for name, count in before.items()}
