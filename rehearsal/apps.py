from django.apps import AppConfig


class RehearsalConfig(AppConfig):
    """The development tooling on top of the product: the whole rollout rehearsed in a scratch
    database (`rehearse`), the benchmarks (`bench`), the embedded PostgreSQL they run on without
    DATABASE_URL, and their worker processes and latency statistics."""

    name = "rehearsal"
    verbose_name = "Rehearsal"
