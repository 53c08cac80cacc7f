"""Read-only console views of the ledger: money moves only through the posting function."""

from django.contrib import admin

from ledger.models import Account, Entry, Transaction
from ledger.templatetags.console import amount_column, table_column


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class EntryInline(admin.TabularInline):
    model = Entry
    fields = ("account", "side", "amount_shown", "seq", "balance_after_shown")
    readonly_fields = fields
    amount_shown = amount_column("amount", "amount", currency_field="currency_id")
    balance_after_shown = amount_column(
        "balance_after", "balance after", currency_field="currency_id"
    )
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "code",
        "user_id",
        "account_type",
        "currency",
        "normal_balance",
        "balance_shown",
        "entry_count",
        "allow_negative",
    )
    list_filter = ("currency", "account_type", "allow_negative")
    search_fields = ("=id", "code", "=user_id")
    balance_shown = amount_column("balance", "balance", currency_field="currency_id")

    def get_fields(self, request, obj=None):
        return [
            "balance_shown" if name == "balance" else name
            for name in super().get_fields(request, obj)
        ]


@admin.register(Transaction)
class TransactionAdmin(ReadOnlyAdmin):
    list_display = ("id", "namespace", "reference_id", "kind", "created_at")
    list_filter = ("namespace", "kind")
    search_fields = ("=id", "reference_id")
    date_hierarchy = "created_at"
    inlines = [EntryInline]
    metadata_shown = table_column("metadata", "metadata")

    def get_fields(self, request, obj=None):
        return [
            "metadata_shown" if name == "metadata" else name
            for name in super().get_fields(request, obj)
        ]


@admin.register(Entry)
class EntryAdmin(ReadOnlyAdmin):
    list_display = ("id", "transaction", "account", "side", "amount_shown", "balance_after_shown")
    amount_shown = EntryInline.amount_shown
    balance_after_shown = EntryInline.balance_after_shown

    def get_fields(self, request, obj=None):
        shown = {"amount": "amount_shown", "balance_after": "balance_after_shown"}
        return [shown.get(name, name) for name in super().get_fields(request, obj)]

    list_filter = ("side", "currency")
    search_fields = ("=transaction__id", "=account__id", "transaction__reference_id")
    list_select_related = ("transaction", "account")
