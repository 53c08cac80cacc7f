"""The first phase state, from the environment's flags (settings.INITIAL_PHASE)."""

from django.conf import settings
from django.db import migrations
from django.utils import timezone


def seed(apps, schema_editor):
    PhaseState = apps.get_model("cutover", "PhaseState")
    PhaseAudit = apps.get_model("cutover", "PhaseAudit")
    _, created = PhaseState.objects.get_or_create(
        pk=1, defaults={"phase": settings.INITIAL_PHASE, "entered_at": timezone.now()}
    )
    if created:
        PhaseAudit.objects.create(
            actor="environment",
            action="seed",
            from_phase=settings.INITIAL_PHASE,
            to_phase=settings.INITIAL_PHASE,
            reason="first start: phase from the feature flags",
            evidence={},
        )


class Migration(migrations.Migration):
    dependencies = [("cutover", "0002_database_rules")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
