"""Alerts logged when their state changes, not each time someone looks: the last state of each
alert is kept in cutover_alert_states, and only the observation that flips it is told so."""

from django.db import connection

ALERT_STATE_CHANGE_SQL = """
    INSERT INTO cutover_alert_states (name, firing, changed_at) VALUES (%s, %s, now())
    ON CONFLICT (name) DO UPDATE SET firing = EXCLUDED.firing, changed_at = now()
     WHERE cutover_alert_states.firing IS DISTINCT FROM EXCLUDED.firing
    RETURNING (xmax = 0) AS inserted
"""


def alert_state_change(*, name: str, firing: bool) -> bool:
    """Record whether the alert `name` fires now; True for the one observation that changed
    it (concurrent observers of the same change: one of them), so its caller logs the change
    once. An alert first observed quiet is no change. One statement: atomic on its own, in
    autocommit or inside a caller's transaction."""
    with connection.cursor() as cursor:
        cursor.execute(ALERT_STATE_CHANGE_SQL, [name, firing])
        row = cursor.fetchone()
    if row is None:  # the same state as recorded
        return False
    (inserted,) = row
    return firing or not inserted
