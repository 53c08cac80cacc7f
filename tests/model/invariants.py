"""The model's invariants, each a function of the stored state (and, for custody, of what the
sandboxes hold) that returns the violations it finds: an empty list when the invariant holds.
They read the database with plain SQL, so that they see what is stored, not what our code
believes; tests/model/test_invariants_fail.py corrupts the state and shows each one report it."""

from decimal import Decimal

from django.db import connection

from ledger.selectors import shard_codes

DUAL_WRITE = ("shadow", "read_switch", "strict")
LEGACY_AUTHORITATIVE = ("legacy", "shadow", "read_switch", "strict")


def _rows(sql: str, params=None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params or [])
        return cursor.fetchall()


def phase() -> str:
    return _rows("SELECT phase FROM cutover_phase_state WHERE id = 1")[0][0]


def transactions_balanced() -> list[str]:
    """Every ledger transaction balances per currency, from the stored entries."""
    return [
        f"transaction {tx} {currency}: debits {debits} != credits {credits}"
        for tx, currency, debits, credits in _rows(
            """
            SELECT transaction_id, currency,
                   sum(amount) FILTER (WHERE side = 'debit'),
                   sum(amount) FILTER (WHERE side = 'credit')
              FROM ledger_entries GROUP BY transaction_id, currency
            HAVING coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0)
                <> coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0)
            """
        )
    ]


def balances_non_negative() -> list[str]:
    """No user balance below zero, in either store; no system account that may not."""
    found = [
        f"ledger account {code or user} {currency} is {balance}"
        for code, user, currency, balance in _rows(
            """
            SELECT code, user_id, currency, balance FROM ledger_accounts
             WHERE balance < 0 AND (user_id IS NOT NULL OR NOT allow_negative)
            """
        )
    ]
    found += [
        f"legacy balance of {user} is {amount} {currency}"
        for user, amount, currency in _rows(
            "SELECT user_id, buying_power, currency FROM balances WHERE buying_power < 0"
        )
    ]
    return found


def cached_balances_match_entries() -> list[str]:
    """Each account's cached balance is the signed sum of its entries (on its normal side)."""
    return [
        f"account {code or user} {currency}: cached {cached} != entries {summed}"
        for code, user, currency, cached, summed in _rows(
            """
            SELECT a.code, a.user_id, a.currency, a.balance,
                   coalesce(sum(CASE WHEN e.side = a.normal_balance THEN e.amount
                                     ELSE -e.amount END), 0)
              FROM ledger_accounts a LEFT JOIN ledger_entries e ON e.account_id = a.id
             GROUP BY a.id
            HAVING a.balance <> coalesce(sum(CASE WHEN e.side = a.normal_balance THEN e.amount
                                                  ELSE -e.amount END), 0)
            """
        )
    ]


STORE_DIFFERENCES_SQL = """
    WITH legacy AS (
        SELECT user_id, currency, buying_power AS amount FROM balances
    ), ledger AS (
        SELECT user_id, currency, balance AS amount FROM ledger_accounts
         WHERE user_id IS NOT NULL AND account_type = lower(currency) || '_balance'
    )
    SELECT coalesce(l.user_id, g.user_id), coalesce(l.currency, g.currency),
           coalesce(l.amount, 0), coalesce(g.amount, 0)
      FROM legacy l FULL JOIN ledger g ON g.user_id = l.user_id AND g.currency = l.currency
     WHERE coalesce(l.amount, 0) <> coalesce(g.amount, 0)
"""


def stores_agree_or_named() -> list[str]:
    """In shadow, read_switch and strict (both stores written), every user's legacy balance
    equals their ledger balance, or an unresolved discrepancy names that exact difference."""
    if phase() not in DUAL_WRITE:
        return []
    named = {
        (user, currency): (legacy, ledger)
        for user, currency, legacy, ledger in _rows(
            """
            SELECT user_id, currency, coalesce(legacy_balance, 0), coalesce(ledger_balance, 0)
              FROM cutover_discrepancies
             WHERE status IN ('open', 'investigating', 'known_difference')
            """
        )
    }
    return [
        f"user {user} {currency}: legacy {legacy} != ledger {ledger}"
        + (
            f" (the open discrepancy says {named[(user, currency)]})"
            if (user, currency) in named
            else ", no open discrepancy"
        )
        for user, currency, legacy, ledger in _rows(STORE_DIFFERENCES_SQL)
        if named.get((user, currency)) != (legacy, ledger)
    ]


def user_money(opening: dict) -> list[str]:
    """Each user's balance in the phase's authoritative store (legacy until strict, the ledger
    in cutover) equals the opening balance the model gave them plus what the balance path's
    journal applied to them: every mutation counted exactly once, and a rollback (from cutover
    too) loses nothing. `opening` maps (user_id, currency) to the legacy balance at creation."""
    expected: dict[tuple, Decimal] = {key: Decimal(amount) for key, amount in opening.items()}
    for user, currency, direction, amount in _rows(
        "SELECT user_id, currency, direction, amount FROM cutover_balance_mutations"
    ):
        sign = 1 if direction == "credit" else -1
        expected[(user, currency)] = expected.get((user, currency), Decimal(0)) + sign * amount
    if phase() in LEGACY_AUTHORITATIVE:
        stored = {
            (user, currency): amount
            for user, amount, currency in _rows(
                "SELECT user_id, buying_power, currency FROM balances"
            )
        }
        store = "legacy"
    else:
        stored = {
            (user, currency): amount
            for user, currency, amount in _rows(
                """
                SELECT user_id, currency, balance FROM ledger_accounts
                 WHERE user_id IS NOT NULL AND account_type = lower(currency) || '_balance'
                """
            )
        }
        store = "ledger"
    found = []
    for key in sorted(set(expected) | set(stored), key=str):
        want, have = expected.get(key, Decimal(0)), stored.get(key, Decimal(0))
        if want != have:
            found.append(
                f"user {key[0]} {key[1]}: {store} store {have} != opening + journal {want}"
            )
    return found


# Conservation, from the ledger's account balances (sharded accounts summed over their shards:
# by account type, which a shard shares with its base). The buffers' codes and account types;
# read by code, a buffer is summed over its shards (shard_codes).
ASSETS = {"USDC": "usdc_buffer", "USD": "fiat_buffer"}


def _type_balances() -> dict[tuple[str, str], Decimal]:
    """(account type or 'users', currency) -> balance, on each account's normal side."""
    totals: dict[tuple[str, str], Decimal] = {}
    for account_type, user, currency, balance in _rows(
        "SELECT account_type, user_id, currency, balance FROM ledger_accounts"
    ):
        key = ("users" if user is not None else account_type, currency)
        totals[key] = totals.get(key, Decimal(0)) + balance
    return totals


def conservation() -> list[str]:
    """Per currency: user liabilities + pending withdrawal holds == custody assets (the buffer)
    - equity, where equity here is what the ledger owes to or holds from outside the custody:
    opening-balance equity (debit-normal: what the backfill brought in), the clearing accounts
    of API credits and debits, and conversions in flight. Every account of the ledger is in
    exactly one term: an account type this does not name is itself a violation."""
    totals = _type_balances()
    named = {
        "users",
        "usdc_buffer",
        "fiat_buffer",
        "withdrawals_pending",
        "opening_balance_equity",
        "deposits_clearing",
        "withdrawals_clearing",
        "conversion_clearing",
        "fees",
    }
    found = [
        f"account type {kind} ({currency}) is in no term of the conservation equation"
        for kind, currency in totals
        if kind not in named and totals[(kind, currency)] != 0
    ]
    for currency, buffer in ASSETS.items():

        def get(kind: str, currency: str = currency) -> Decimal:
            return totals.get((kind, currency), Decimal(0))

        liabilities = get("users") + get("withdrawals_pending")
        # Debit-normal equity and clearing accounts add to the assets' side, credit-normal
        # ones (withdrawals clearing: API debits; fees) to the liabilities' side.
        custody_less_equity = (
            get(buffer)
            + get("opening_balance_equity")
            + get("deposits_clearing")
            + get("conversion_clearing")
            - get("withdrawals_clearing")
            - get("fees")
        )
        if liabilities != custody_less_equity:
            found.append(
                f"{currency}: users {get('users')} + pending {get('withdrawals_pending')} "
                f"!= {buffer} {get(buffer)} + opening equity {get('opening_balance_equity')} "
                f"+ deposits clearing {get('deposits_clearing')} + conversion clearing "
                f"{get('conversion_clearing')} - withdrawals clearing "
                f"{get('withdrawals_clearing')} - fees {get('fees')}"
            )
    return found


def holds_match_withdrawals() -> list[str]:
    """`withdrawals_pending_usdc` holds exactly the open withdrawals whose hold reached the
    ledger (pending, submitted or dead): no hold stranded, none missing."""
    [(pending,)] = _rows(
        "SELECT coalesce(sum(balance), 0) FROM ledger_accounts "
        "WHERE account_type = 'withdrawals_pending' AND currency = 'USDC'"
    )
    [(open_held,)] = _rows(
        "SELECT coalesce(sum(amount), 0) FROM onchain_withdrawals "
        "WHERE hold_in_ledger AND status IN ('pending', 'submitted', 'dead')"
    )
    if pending != open_held:
        return [
            f"withdrawals_pending_usdc holds {pending} but the open withdrawals held in the "
            f"ledger add up to {open_held}"
        ]
    return []


def conversions_within_source_minimum() -> list[str]:
    """Open conversion jobs never take a source buffer below its own minimum (issue 9 path 5):
    what they take from a buffer is at most its balance above its minimum."""
    found = []
    for currency, buffer in ASSETS.items():
        [(balance, minimum, committed)] = _rows(
            """
            SELECT (SELECT sum(balance) FROM ledger_accounts WHERE code = ANY(%s)),
                   (SELECT minimum FROM treasury_buffer_thresholds WHERE currency = %s),
                   (SELECT coalesce(sum(source_amount), 0) FROM treasury_conversion_jobs
                     WHERE source_currency = %s AND status IN ('pending', 'submitted'))
            """,
            [shard_codes(buffer), currency, currency],
        )
        if committed > max(balance - minimum, Decimal(0)):
            found.append(
                f"{currency}: open conversions take {committed} from a buffer of {balance} "
                f"whose minimum is {minimum}"
            )
    return found


def rollback_possible() -> list[str]:
    """The emergency rollback would succeed from this state, in every phase but legacy: the
    whole rollback (write fence, rebuild from cutover, equality proof) runs and is undone
    (`cutover rollback --dry-run`)."""
    from cutover.exceptions import TransitionRefused
    from cutover.phase_machine import phase_rollback_rehearse

    if phase() == "legacy":
        return []
    try:
        phase_rollback_rehearse()
    except TransitionRefused as exc:
        return [f"the rollback would be refused: {exc}"]
    return []


def every_invariant(opening: dict) -> dict[str, list[str]]:
    """Every per-step invariant, by name: the violations each one found."""
    return {
        "transactions_balanced": transactions_balanced(),
        "balances_non_negative": balances_non_negative(),
        "cached_balances_match_entries": cached_balances_match_entries(),
        "stores_agree_or_named": stores_agree_or_named(),
        "user_money": user_money(opening),
        "conservation": conservation(),
        "holds_match_withdrawals": holds_match_withdrawals(),
        "conversions_within_source_minimum": conversions_within_source_minimum(),
        "rollback_possible": rollback_possible(),
    }


# At quiescence (every worker driven until nothing changes): custody and nothing stuck.


def custody_matches_providers(
    *, circle_wallet: Decimal, due_fiat: Decimal, opened: set
) -> list[str]:
    """The ledger's buffers equal what the providers hold, for each currency whose custody
    was opened: the Circle wallet (USDC) and the fiat held at Due (USD), as the model computed
    them from the sandboxes' own records."""
    found = []
    for currency, held in (("USDC", circle_wallet), ("USD", due_fiat)):
        if currency not in opened:
            continue
        [(buffer,)] = _rows(
            "SELECT sum(balance) FROM ledger_accounts WHERE code = ANY(%s)",
            [shard_codes(ASSETS[currency])],
        )
        if buffer != held:
            found.append(
                f"{ASSETS[currency]} is {buffer} in the ledger but the provider holds {held} "
                f"(difference {buffer - held})"
            )
    return found


def nothing_stuck() -> list[str]:
    """After the workers were driven to quiescence, every withdrawal and conversion job is
    final, or dead waiting for an operator (counted by the caller); no notification is left
    parked or failed, except a deposit to an address nobody registered."""
    found = [
        f"withdrawal {pk} ({key}) is still {status}: {error[:200]}"
        for pk, key, status, error in _rows(
            "SELECT id, idempotency_key, status, last_error FROM onchain_withdrawals "
            "WHERE status IN ('pending', 'submitted')"
        )
    ]
    found += [
        f"conversion job {pk} is still {status}: {error[:200]}"
        for pk, status, error in _rows(
            "SELECT id, status, last_error FROM treasury_conversion_jobs "
            "WHERE status IN ('pending', 'submitted')"
        )
    ]
    found += [
        f"notification {nid} ({kind}, transfer {transfer}: {body[:400]}) is {status}: "
        f"{error[-300:]}"
        for nid, kind, transfer, body, status, error in _rows(
            "SELECT notification_id, notification_type, transfer_id, body, status, error "
            "FROM onchain_circle_notifications n WHERE status IN ('parked', 'failed')"
            # A deposit to an address nobody registered waits for an operator by design.
            " AND NOT (status = 'parked' AND NOT EXISTS (SELECT 1 FROM onchain_deposit_addresses"
            "  a WHERE a.address = n.body::jsonb -> 'notification' -> 'destination' ->> 'address')"
            "  AND n.body::jsonb -> 'notification' -> 'source' ->> 'type' <> 'wallet')"
        )
    ]
    return found
