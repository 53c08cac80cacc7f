"""The benchmark's URLs: the product's, plus the floor of `bench webhooks`."""

from django.urls import path

from config.urls import handler400, handler403, handler404, handler500, urlpatterns
from rehearsal.bench_floor import FLOOR_PATH, floor_receive

__all__ = ["handler400", "handler403", "handler404", "handler500", "urlpatterns"]

urlpatterns = [*urlpatterns, path(FLOOR_PATH.lstrip("/"), floor_receive, name="bench-floor")]
