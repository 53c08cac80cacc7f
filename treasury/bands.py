"""Thresholds and providers: setting a buffer's band (validated first) and enabling,
disabling or reordering a conversion provider, each audited in the same transaction."""

from decimal import Decimal

from django.db import transaction

from cutover.actors import Actor
from cutover.operator_audit import operator_action_record
from ledger.selectors import BUFFER_ACCOUNTS
from treasury.exceptions import ProviderInvalid, ThresholdInvalid
from treasury.models import BufferThreshold, ConversionProvider
from treasury.selectors import quantum


def threshold_validate(
    *, currency: str, minimum: Decimal, target: Decimal, maximum: Decimal
) -> None:
    """A buffer's band must be 0 <= minimum <= target <= maximum, in the currency's precision;
    ThresholdInvalid names the field otherwise."""
    if currency not in BUFFER_ACCOUNTS:
        raise ThresholdInvalid("currency", f"no buffer holds {currency!r}")
    for name, value in (("minimum", minimum), ("target", target), ("maximum", maximum)):
        if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
            raise ThresholdInvalid(name, f"{name} must be a decimal of at least 0")
        if value != value.quantize(quantum(currency)) or value >= Decimal("1e20"):
            raise ThresholdInvalid(name, f"{name} has too many places or digits for {currency}")
    if minimum > target:
        raise ThresholdInvalid("minimum", "minimum must not exceed target")
    if target > maximum:
        raise ThresholdInvalid("maximum", "maximum must not be below target")


def _threshold_values(threshold: BufferThreshold | None) -> dict:
    if threshold is None:
        return {}
    return {name: str(getattr(threshold, name)) for name in ("minimum", "target", "maximum")}


def threshold_set(
    *,
    currency: str,
    minimum: Decimal,
    target: Decimal,
    maximum: Decimal,
    actor: Actor,
    reason: str,
) -> BufferThreshold:
    """Set a buffer's band (validated first: nothing changes when it is refused), audited in
    the same transaction."""
    threshold_validate(currency=currency, minimum=minimum, target=target, maximum=maximum)
    if not reason or not reason.strip():
        raise ThresholdInvalid("reason", "a reason is required to change a threshold")
    actor.require("treasury.change_bufferthreshold")
    # Not durable: the admin's change form calls this inside a transaction of its own.
    with transaction.atomic():
        before = BufferThreshold.objects.select_for_update().filter(currency=currency).first()
        before_values = _threshold_values(before)
        threshold, _ = BufferThreshold.objects.update_or_create(
            currency=currency,
            defaults={"minimum": minimum, "target": target, "maximum": maximum},
        )
        threshold.refresh_from_db()  # the stored values, as `before` shows them
        operator_action_record(
            actor=actor,
            action="threshold.set",
            target=f"threshold:{currency}",
            before=before_values,
            after=_threshold_values(threshold),
            reason=reason.strip(),
        )
    return threshold


def provider_set(
    *,
    code: str,
    actor: Actor,
    reason: str,
    enabled: bool | None = None,
    priority: int | None = None,
) -> ConversionProvider:
    """Enable or disable a provider, or change its priority (lower goes first), audited in the
    same transaction. Where its API is stays in the settings."""
    if not reason or not reason.strip():
        raise ProviderInvalid("reason", "a reason is required to change a provider")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or priority < 0
    ):
        raise ProviderInvalid("priority", "priority must be a whole number of at least 0")
    actor.require("treasury.change_conversionprovider")
    # Not durable: the admin's change form calls this inside a transaction of its own.
    with transaction.atomic():
        provider = ConversionProvider.objects.select_for_update().get(code=code)
        before = {"enabled": provider.enabled, "priority": provider.priority}
        if enabled is not None:
            provider.enabled = bool(enabled)
        if priority is not None:
            provider.priority = priority
        provider.save(update_fields=["enabled", "priority"])
        operator_action_record(
            actor=actor,
            action="provider.set",
            target=f"provider:{code}",
            before=before,
            after={"enabled": provider.enabled, "priority": provider.priority},
            reason=reason.strip(),
        )
    return provider
