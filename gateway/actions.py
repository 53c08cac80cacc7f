"""Operators' admin actions on selected rows, in every console: the confirmation page (the rows,
with their attempts and last error for outbox rows, an optional form such as a reason, and one
button, named as the page unless told, that posts the action again with `confirmed=yes`), and
the action run row by row once confirmed; the operator's written reason on those forms
(`reason_field`), and the change page of rows that change only through actions
(`ActionsOnlyFields`)."""

from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms import Form
from django.http import HttpRequest
from django.template.response import TemplateResponse

from gateway.commands import REASON_MAX_LENGTH


def action_confirm(
    model_admin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet,
    *,
    action: str,
    title: str,
    button: str = "",
    question: str = "",
    form: Form | None = None,
    attempts: bool = False,
) -> TemplateResponse:
    context = {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "question": question,
        "button": button or title,
        "action": action,
        "queryset": queryset,
        "form": form,
        "attempts": attempts,
        "opts": model_admin.model._meta,
        "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/gateway/action_confirm.html", context)


def action_run(
    model_admin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet,
    apply: Callable[..., object],
    *,
    form_class: type[Form] | None = None,
    **confirm,
) -> TemplateResponse | None:
    """An operator's action on the selected rows: the confirmation page (with `form_class`'s
    fields, if any) until it is confirmed and valid; then `apply(row, **cleaned_data)` on each
    row, its outcome or its failure reported row by row."""
    confirmed = request.POST.get("confirmed") == "yes"
    data: dict = {}
    if form_class is None:
        if not confirmed:
            return action_confirm(model_admin, request, queryset, **confirm)
    else:
        form = form_class(request.POST if confirmed else None)
        if not form.is_valid():
            return action_confirm(model_admin, request, queryset, form=form, **confirm)
        data = form.cleaned_data
    for row in queryset:
        try:
            done = apply(row, **data)
        except Exception as exc:  # any failure is the operator's to see, per row
            model_admin.message_user(request, f"{row}: {exc}", messages.ERROR)
        else:
            model_admin.message_user(request, str(done), messages.SUCCESS)
    return None


def reason_field(
    help_text: str = "Why: kept in the operator audit.", *, required: bool = True, cols: int = 60
) -> forms.CharField:
    """The text an operator writes for a change (a reason, a note), kept in the operator
    audit: at most REASON_MAX_LENGTH characters, as the commands' `--reason` (a few
    sentences, not a document; the console took any length the request limit let through)."""
    return forms.CharField(
        max_length=REASON_MAX_LENGTH,
        required=required,
        widget=forms.Textarea(attrs={"rows": 3, "cols": cols}),
        help_text=help_text,
    )


class ActionsOnlyFields:
    """A ModelAdmin mixin for rows that change only through the admin's actions (its change
    permission is the actions'): the change page shows every field of the model, read-only;
    a field named in `shown_as` as the display column named there (an amount in its
    currency)."""

    shown_as: dict[str, str] = {}

    def get_readonly_fields(self, request, obj=None):
        return [self.shown_as.get(field.name, field.name) for field in self.model._meta.fields]

    def get_fields(self, request, obj=None):
        return self.get_readonly_fields(request, obj)
