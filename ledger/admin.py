"""Read-only console views of the ledger: money moves only through the posting function."""

from django.contrib import admin

from ledger.models import Account, Entry, Transaction


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class EntryInline(admin.TabularInline):
    model = Entry
    fields = ("account", "side", "amount", "currency", "seq", "balance_after")
    readonly_fields = fields
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
        "balance",
        "entry_count",
        "allow_negative",
    )
    list_filter = ("currency", "account_type", "allow_negative")
    search_fields = ("=id", "code", "=user_id")


@admin.register(Transaction)
class TransactionAdmin(ReadOnlyAdmin):
    list_display = ("id", "namespace", "reference_id", "kind", "created_at")
    list_filter = ("namespace", "kind")
    search_fields = ("=id", "reference_id")
    date_hierarchy = "created_at"
    inlines = [EntryInline]


@admin.register(Entry)
class EntryAdmin(ReadOnlyAdmin):
    list_display = ("id", "transaction", "account", "side", "amount", "currency", "balance_after")
    list_filter = ("side", "currency")
    search_fields = ("=transaction__id", "=account__id", "transaction__reference_id")
    list_select_related = ("transaction", "account")
