"""The on-chain console: the Circle inbox (with replay), withdrawals (dead ones resent or
cancelled by an operator, after a confirmation) and users' deposit addresses."""

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest

from cutover.actors import Actor
from cutover.selectors import user_currency
from gateway.actions import action_run
from ledger.admin import ReadOnlyAdmin
from onchain.inbox import notification_replay
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.withdrawals import withdrawal_cancel, withdrawal_resend


@admin.register(CircleNotification)
class CircleNotificationAdmin(ReadOnlyAdmin):
    list_display = (
        "received_at",
        "notification_type",
        "notification_id",
        "status",
        "deliveries",
        "attempts",
    )
    list_filter = ("status", "notification_type")
    search_fields = ("notification_id", "body")
    actions = ["replay"]

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


class DepositAddressForm(forms.ModelForm):
    class Meta:
        model = DepositAddress
        fields = ("address", "chain", "user_id", "currency")

    def clean(self):
        # PostgreSQL refuses it too (OC002); here the operator gets the reason on the form.
        data = super().clean()
        held = data.get("user_id") and user_currency(data["user_id"])
        if held and held != data.get("currency"):
            raise forms.ValidationError(
                f"user {data['user_id']} holds {held}: a {data.get('currency')} deposit address "
                "would take deposits that can never be credited"
            )
        return data


@admin.register(DepositAddress)
class DepositAddressAdmin(admin.ModelAdmin):
    form = DepositAddressForm
    list_display = ("address", "chain", "user_id", "currency", "created_at")
    search_fields = ("address", "=user_id")


class CancelForm(forms.Form):
    reason = forms.CharField(
        help_text=(
            "Circle is asked first: a withdrawal whose transfer Circle has is not cancelled "
            "but follows Circle's status."
        ),
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
    )


@admin.register(Withdrawal)
class WithdrawalAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "user_id",
        "amount",
        "chain",
        "address",
        "status",
        "attempts",
        "next_attempt_at",
        "circle_transfer_id",
    )
    list_filter = ("status", "chain")
    search_fields = ("=user_id", "=idempotency_key", "circle_transfer_id", "address")
    actions = ["resend", "cancel"]

    def has_change_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("onchain.change_withdrawal")

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

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
