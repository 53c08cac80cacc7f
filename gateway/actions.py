"""The confirmation page of an operator's admin action on selected rows, in every console: the
rows (with their attempts and last error, for outbox rows), an optional form (a reason, a note)
and one button (named as the page, unless told) that posts the action again with
`confirmed=yes`."""

from django.contrib import admin
from django.db.models import QuerySet
from django.forms import Form
from django.http import HttpRequest
from django.template.response import TemplateResponse


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
