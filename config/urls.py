from django.contrib import admin
from django.urls import include, path

from config import metrics, views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    # The cockpit is the admin's index (and its actions): matched before the admin's own URLs.
    path("admin/", include("config.cockpit_admin")),
    path("admin/", admin.site.urls),
    path("api/v1/openapi.json", views.openapi, name="openapi"),
    path("", include("cutover.urls")),
    path("", include("onchain.urls")),
    path("", include("treasury.urls")),
    path("metrics", metrics.metrics, name="metrics"),
]

# The API's JSON error for what Django answers itself (the admin keeps its HTML pages).
handler400 = "gateway.errors.bad_request"
handler403 = "gateway.errors.permission_denied"
handler404 = "gateway.errors.not_found"
handler500 = "gateway.errors.server_error"
