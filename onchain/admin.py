"""The on-chain console: the Circle inbox (with replay; refused notifications say why),
transfer discrepancies (resolved with a note), withdrawals (dead ones resent or cancelled by an
operator, after a confirmation) and users' deposit addresses."""

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import csrf_protect_m
from django.http import HttpRequest

from cutover.actors import Actor
from cutover.selectors import user_currency
from gateway.actions import ActionsOnlyFields, action_run, reason_field
from ledger.admin import ReadOnlyAdmin
from ledger.templatetags.console import amount_column, moment_column
from onchain.addresses import DEPOSIT_CURRENCIES, deposit_address_add, deposit_address_remove
from onchain.chains import CHAINS, address_validate
from onchain.discrepancies import transfer_discrepancy_resolve
from onchain.exceptions import AddressInvalid
from onchain.inbox import notification_replay
from onchain.models import (
    CircleNotification,
    DepositAddress,
    TransferDiscrepancy,
    Withdrawal,
)
from onchain.withdrawals import withdrawal_cancel, withdrawal_resend


@admin.register(CircleNotification)
class CircleNotificationAdmin(ReadOnlyAdmin):
    list_display = (
        "received_at",
        "notification_type",
        "notification_id",
        "status",
        "error_summary",
        "deliveries",
        "attempts",
    )
    list_filter = ("status", "notification_type")
    search_fields = ("notification_id", "body")
    actions = ["replay"]

    @admin.display(description="why (refused, failed)")
    def error_summary(self, notification: CircleNotification) -> str:
        return notification.error.strip().splitlines()[-1][:120] if notification.error else ""

    @admin.action(description="Process the selected notifications again", permissions=["view"])
    def replay(self, request, queryset):
        if not request.user.has_perm("onchain.change_circlenotification"):
            self.message_user(request, "You may not replay notifications.", messages.ERROR)
            return
        for notification in queryset:
            try:
                status = notification_replay(
                    notification_id=notification.notification_id,
                    actor=Actor.for_user(request.user),
                )
            except Exception as exc:  # any failure: shown here, and kept on the row
                self.message_user(request, f"{notification}: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{notification}: {status}", messages.SUCCESS)


class ResolveForm(forms.Form):
    note = reason_field("What was done (the difference credited or debited, or why none): audited.")


@admin.register(TransferDiscrepancy)
class TransferDiscrepancyAdmin(ActionsOnlyFields, ReadOnlyAdmin):
    list_display = (
        "created_at",
        "status",
        "transfer_id",
        "credited_shown",
        "notified_amount",
        "resolved_by",
    )
    # Deposits that reach a discrepancy are USDC (onchain.deposits credits nothing else).
    credited_shown = amount_column("credited_amount", "credited", currency="USDC")
    shown_as = {"credited_amount": "credited_shown"}
    list_filter = ("status",)
    search_fields = ("transfer_id", "notification_id")
    actions = ["resolve"]

    def has_change_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("onchain.change_transferdiscrepancy")

    @admin.action(description="Resolve the selected discrepancies", permissions=["change"])
    def resolve(self, request: HttpRequest, queryset):
        def apply(discrepancy, note):
            transfer_discrepancy_resolve(
                discrepancy_id=discrepancy.pk, actor=Actor.for_user(request.user), note=note
            )
            return "resolved"

        return action_run(
            self,
            request,
            queryset,
            apply,
            form_class=ResolveForm,
            action="resolve",
            title="Resolve transfer discrepancies",
            question="Mark these discrepancies resolved? Move any money first, through the "
            "balance path.",
        )


class DepositAddressForm(forms.ModelForm):
    """Registers an address through onchain.addresses.deposit_address_add; its rules are checked
    here too, so the operator sees a refusal on the form rather than an error page."""

    chain = forms.ChoiceField(choices=[(chain, chain) for chain in sorted(CHAINS)])
    currency = forms.ChoiceField(choices=[(code, code) for code in DEPOSIT_CURRENCIES])
    reason = reason_field()

    class Meta:
        model = DepositAddress
        fields = ("address", "chain", "user_id", "currency")

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        try:
            # The stored form, so the model's constraints (one user per chain and address,
            # EVM in lower case) are checked on what will be stored.
            data["address"] = address_validate(chain=data["chain"], address=data["address"])
        except AddressInvalid as exc:
            self.add_error(exc.field, str(exc))
            return data
        # PostgreSQL refuses it too (OC002); here the operator gets the reason on the form.
        held = user_currency(data["user_id"])
        if held and held != data["currency"]:
            self.add_error(
                "currency",
                f"user {data['user_id']} holds {held}: a {data['currency']} deposit address "
                "would take deposits that can never be credited",
            )
        return data


class RemoveForm(forms.Form):
    reason = reason_field()


@admin.register(DepositAddress)
class DepositAddressAdmin(admin.ModelAdmin):
    """Added through the service (audited, parked deposits replayed), removed by an action with
    a reason; never edited in place (another user's address is a removal and an addition)."""

    form = DepositAddressForm
    list_display = ("address", "chain", "user_id", "currency", "created_at")
    list_filter = ("chain",)
    search_fields = ("address", "=user_id")
    actions = ["remove"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_remove_permission(self, request) -> bool:
        return request.user.has_perm("onchain.delete_depositaddress")

    @csrf_protect_m
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        # Django runs the form in one transaction; the service must run outside any: it commits
        # the address durably, then replays each parked deposit in a transaction of its own.
        if object_id is None and request.method == "POST":
            return self._changeform_view(request, object_id, form_url, extra_context)
        return super().changeform_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change) -> None:
        added = deposit_address_add(
            address=form.cleaned_data["address"],
            chain=form.cleaned_data["chain"],
            user_id=form.cleaned_data["user_id"],
            currency=form.cleaned_data["currency"],
            actor=Actor.for_user(request.user),
            reason=form.cleaned_data["reason"],
        )
        obj.pk, obj.address = added.address.pk, added.address.address
        for notification_id, status in added.replayed.items():
            level = messages.ERROR if status.startswith("failed") else messages.SUCCESS
            self.message_user(request, f"parked notification {notification_id}: {status}", level)

    @admin.action(description="Remove the selected deposit addresses", permissions=["remove"])
    def remove(self, request: HttpRequest, queryset):
        def apply(row, reason):
            deposit_address_remove(
                address=row.address,
                chain=row.chain,
                actor=Actor.for_user(request.user),
                reason=reason,
            )
            return f"{row} removed"

        return action_run(
            self,
            request,
            queryset,
            apply,
            form_class=RemoveForm,
            action="remove",
            title="Remove deposit addresses",
            question="Remove these deposit addresses? Later deposits to them are parked.",
        )


class CancelForm(forms.Form):
    reason = reason_field(
        "Circle is asked first: a withdrawal whose transfer Circle has is not cancelled "
        "but follows Circle's status."
    )


@admin.register(Withdrawal)
class WithdrawalAdmin(ActionsOnlyFields, ReadOnlyAdmin):
    # The status first, so it is in view on a 1280 px screen beside the filters; the user,
    # the full address and Circle's transfer id are on the withdrawal's page.
    list_display = (
        "created",
        "status",
        "amount_shown",
        "attempts",
        "next_attempt",
        "destination",
    )
    list_filter = ("status", "chain")
    search_fields = ("=user_id", "=idempotency_key", "circle_transfer_id", "address")
    actions = ["resend", "cancel"]
    amount_shown = amount_column("amount", "amount")
    shown_as = {"amount": "amount_shown"}
    created = moment_column("created_at", "created")
    next_attempt = moment_column("next_attempt_at", "next attempt", ago=True)

    @admin.display(description="to")
    def destination(self, withdrawal: Withdrawal) -> str:
        address = withdrawal.address
        short = address if len(address) <= 16 else f"{address[:8]}…{address[-6:]}"
        return f"{short} on {withdrawal.chain}"

    def has_change_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("onchain.change_withdrawal")

    def _run(self, request, queryset, service, **confirm):
        def apply(withdrawal, **data):
            return service(withdrawal_id=withdrawal.pk, actor=Actor.for_user(request.user), **data)

        return action_run(self, request, queryset, apply, attempts=True, **confirm)

    @admin.action(description="Send the selected dead withdrawals again", permissions=["change"])
    def resend(self, request: HttpRequest, queryset):
        return self._run(
            request,
            queryset,
            withdrawal_resend,
            action="resend",
            title="Send again",
            question="Send these dead withdrawals to Circle again, with their same idempotency "
            "keys?",
        )

    @admin.action(
        description="Cancel the selected dead withdrawals (return the hold)", permissions=["change"]
    )
    def cancel(self, request: HttpRequest, queryset):
        return self._run(
            request,
            queryset,
            withdrawal_cancel,
            form_class=CancelForm,
            action="cancel",
            title="Cancel withdrawals",
            question="Cancel these dead withdrawals and return the held USDC to their users?",
        )
