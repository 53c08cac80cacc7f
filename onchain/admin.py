"""The on-chain console: the Circle inbox (with replay) and users' deposit addresses."""

from django.contrib import admin, messages

from ledger.admin import ReadOnlyAdmin
from onchain.models import CircleNotification, DepositAddress
from onchain.services import notification_process


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
                status = notification_process(notification_id=notification.notification_id)
            except Exception as exc:  # any failure: shown here, and kept on the row
                self.message_user(request, f"{notification}: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{notification}: {status}", messages.SUCCESS)


@admin.register(DepositAddress)
class DepositAddressAdmin(admin.ModelAdmin):
    list_display = ("address", "chain", "user_id", "currency", "created_at")
    search_fields = ("address", "=user_id")
