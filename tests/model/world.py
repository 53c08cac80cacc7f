"""The world the model runs in: a clean database per example, the Circle and Due sandboxes
(reset per example), and what the providers hold according to the sandboxes' own records."""

from decimal import Decimal

from django.apps import apps
from django.conf import settings
from django.db import connection

from custody.services import custody_open_at, deposits_uncredited_at_circle
from cutover.actors import Actor
from onchain.sandbox import CircleSandbox
from tests.data_migrations import DATA_MIGRATIONS
from treasury.bands import threshold_set
from treasury.sandbox import OUTCOMES, DueSandbox

APP_LABELS = ("ledger", "gateway", "cutover", "onchain", "treasury")
# Small bands, so that the model's amounts move buffers across them.
THRESHOLDS = {"USDC": ("50", "200", "1000"), "USD": ("50", "200", "1000")}


def database_reset() -> None:
    """Every app table emptied and the data migrations run again: a fresh product."""
    tables = [
        model._meta.db_table
        for label in APP_LABELS
        for model in apps.get_app_config(label).get_models()
        if not model._meta.proxy and model._meta.managed
    ]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    for migration in DATA_MIGRATIONS:
        migration(apps, None)
    for currency, (minimum, target, maximum) in THRESHOLDS.items():
        threshold_set(
            currency=currency,
            minimum=Decimal(minimum),
            target=Decimal(target),
            maximum=Decimal(maximum),
            actor=Actor(name="model:operator"),
            reason="the model's bands",
        )


def circle_reset(circle: CircleSandbox) -> None:
    with circle.lock:
        circle.transfers.clear()
        circle.by_key.clear()
        circle.fail_next.clear()
        circle.delay = 0.0
        circle.settle = None
        circle.on_created = None


def due_reset(due: DueSandbox) -> None:
    with due.lock:
        due.conversions.clear()
        due.quotes.clear()
        due.fail_next.clear()
        due.delay = 0.0
        due.settle = None
        due.callback = None


def circle_wallet_flows(circle: CircleSandbox, registered: set[str] | None = None) -> Decimal:
    """What came into and left the Circle wallet since the model began, from the sandbox's
    transfers: inbound deposits (complete on arrival) less outbound transfers that completed.
    Given the `registered` addresses, deposits to any other address are left out (nobody can
    be credited them: parked for an operator, in no buffer by design)."""
    total = Decimal(0)
    with circle.lock:
        for transfer in circle.transfers.values():
            amount = Decimal(transfer["amount"]["amount"])
            if transfer["destination"].get("type") == "wallet":
                attributed = registered is None or transfer["destination"]["address"] in registered
                total += amount if attributed else 0
            elif transfer["source"].get("type") == "wallet" and transfer["status"] == "complete":
                total -= amount
    return total


def due_conversion_flows(due: DueSandbox) -> dict[str, Decimal]:
    """Per currency, what completed conversions at Due added (destination) and took (source);
    one Due is refunding still counts, one it refunded does not (the source came back, the
    payout went)."""
    flows = {"USD": Decimal(0), "USDC": Decimal(0)}
    with due.lock:
        for conversion in due.conversions.values():
            if conversion["status"] not in (OUTCOMES["completed"], "refund_submitted"):
                continue
            flows[conversion["source"]["currency"]] -= Decimal(conversion["source"]["amount"])
            flows[conversion["destination"]["currency"]] += Decimal(
                conversion["destination"]["amount"]
            )
    return flows


def custody_open(*, currency: str, reported: Decimal) -> None:
    """Book the buffer's opening balance from the provider's reported balance."""
    custody_open_at(
        currency=currency,
        reported=reported,
        uncredited=(
            deposits_uncredited_at_circle(base_url=settings.CIRCLE_API_BASE_URL)
            if currency == "USDC"
            else Decimal(0)
        ),
        source="model",
        actor=Actor(name="model:operator"),
        reason="the model opens custody",
    )
