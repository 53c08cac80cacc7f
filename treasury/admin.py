"""The treasury console: providers (enable, priority) and thresholds (validated), each change
with a reason and audited by the services; conversion jobs (retry and cancel through the
services, after a confirmation with a reason), settlement cycles. A provider's API host is not
here: it comes from the settings."""

from datetime import timedelta

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from cutover.actors import Actor
from gateway.actions import ActionsOnlyFields, action_run, reason_field
from ledger.admin import ReadOnlyAdmin
from ledger.templatetags.console import (
    amount_column,
    amount_display,
    duration_column,
    moment_column,
    table_column,
)
from treasury.bands import provider_set, threshold_set, threshold_validate
from treasury.exceptions import ThresholdInvalid
from treasury.models import BufferThreshold, ConversionJob, ConversionProvider, SettlementCycle
from treasury.operators import job_cancel, job_resolve, job_retry, job_reverse

# The reason's help on this console's forms: every change here is audited with its values.
REASON_HELP = "Why: kept in the operator audit with the values before and after."


class SeededAdmin(admin.ModelAdmin):
    """Rows the migrations seed, changed here through a service and never added or deleted:
    providers come with the code that knows their host (settings), one band per buffer."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class ProviderForm(forms.ModelForm):
    reason = reason_field(REASON_HELP)

    class Meta:
        model = ConversionProvider
        fields = ("enabled", "priority")


@admin.register(ConversionProvider)
class ConversionProviderAdmin(SeededAdmin):
    form = ProviderForm
    list_display = ("code", "name", "enabled", "priority", "healthy", "consecutive_failures")
    readonly_fields = (
        "code",
        "name",
        "healthy",
        "consecutive_failures",
        "last_error",
        "last_failure_at",
    )

    def save_model(self, request, obj, form, change) -> None:
        provider_set(
            code=obj.code,
            enabled=form.cleaned_data["enabled"],
            priority=form.cleaned_data["priority"],
            actor=Actor.for_user(request.user),
            reason=form.cleaned_data["reason"],
        )


class ThresholdForm(forms.ModelForm):
    reason = reason_field(REASON_HELP)

    class Meta:
        model = BufferThreshold
        fields = ("minimum", "target", "maximum")

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        try:  # the service's rules, so the form and every other caller agree
            threshold_validate(
                currency=self.instance.currency,
                minimum=data["minimum"],
                target=data["target"],
                maximum=data["maximum"],
            )
        except ThresholdInvalid as exc:
            self.add_error(exc.field, str(exc))
        return data


@admin.register(BufferThreshold)
class BufferThresholdAdmin(SeededAdmin):
    form = ThresholdForm
    list_display = ("currency", "minimum_shown", "target_shown", "maximum_shown", "updated_at")
    readonly_fields = ("currency",)
    minimum_shown = amount_column("minimum", "minimum")
    target_shown = amount_column("target", "target")
    maximum_shown = amount_column("maximum", "maximum")

    def save_model(self, request, obj, form, change) -> None:
        threshold_set(
            currency=obj.currency,
            minimum=form.cleaned_data["minimum"],
            target=form.cleaned_data["target"],
            maximum=form.cleaned_data["maximum"],
            actor=Actor.for_user(request.user),
            reason=form.cleaned_data["reason"],
        )


class ReasonForm(forms.Form):
    reason = reason_field(REASON_HELP)


@admin.register(ConversionJob)
class ConversionJobAdmin(ActionsOnlyFields, ReadOnlyAdmin):
    # The status first, so it is in view on a 1280 px screen beside the filters; the
    # provider's reference and the job's key are on the job's page.
    list_display = (
        "id",
        "status",
        "created",
        "conversion",
        "target_amount_shown",
        "provider",
        "attempts",
    )
    list_filter = ("status", "provider_status", "buffer_currency", "provider")
    search_fields = ("=idempotency_key", "provider_reference")
    actions = ["retry", "cancel", "resolve", "reverse"]
    created = moment_column("created_at", "created")
    source_amount_shown = amount_column(
        "source_amount", "source amount", currency_field="source_currency"
    )
    target_amount_shown = amount_column(
        "target_amount", "received", currency_field="target_currency"
    )
    shown_as = {"source_amount": "source_amount_shown", "target_amount": "target_amount_shown"}

    @admin.display(description="conversion", ordering="source_amount")
    def conversion(self, job: ConversionJob) -> str:
        return f"{amount_display(job.source_amount, job.source_currency)} → {job.target_currency}"

    def has_change_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("treasury.change_conversionjob")

    def _run(self, request, queryset, service, action: str, title: str):
        def apply(job, **data):
            return service(job_id=job.pk, actor=Actor.for_user(request.user), **data)

        return action_run(
            self,
            request,
            queryset,
            apply,
            form_class=ReasonForm,
            action=action,
            title=title,
            attempts=True,
        )

    @admin.action(description="Retry the selected failed jobs as new jobs", permissions=["change"])
    def retry(self, request: HttpRequest, queryset):
        return self._run(request, queryset, job_retry, "retry", "Retry these conversion jobs")

    @admin.action(description="Cancel the selected jobs never sent", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset):
        return self._run(request, queryset, job_cancel, "cancel", "Cancel these conversion jobs")

    @admin.action(
        description="Resolve the selected disputed jobs with the provider's answer now",
        permissions=["change"],
    )
    def resolve(self, request: HttpRequest, queryset):
        return self._run(
            request, queryset, job_resolve, "resolve", "Resolve these disputed conversions"
        )

    @admin.action(
        description="Reverse the selected completed jobs the provider refunded",
        permissions=["change"],
    )
    def reverse(self, request: HttpRequest, queryset):
        return self._run(
            request, queryset, job_reverse, "reverse", "Reverse these refunded conversions"
        )


@admin.register(SettlementCycle)
class SettlementCycleAdmin(ReadOnlyAdmin):
    list_display = ("id", "started_at", "took", "triggered_by", "jobs_created", "note")
    fields = (
        "started_at",
        "finished_at",
        "took",
        "triggered_by",
        "note",
        "jobs_created",
        "decisions",
    )
    took = duration_column(
        "took",
        lambda cycle: (
            None if cycle.duration_ms is None else timedelta(milliseconds=cycle.duration_ms)
        ),
        order="duration_ms",
    )
    decisions = table_column("buffers", "what each buffer was and what was decided")
