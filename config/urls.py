from django.contrib import admin
from django.urls import include, path

from config import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("", include("cutover.urls")),
    path("", include("onchain.urls")),
    path("", include("treasury.urls")),
    path("", include("django_prometheus.urls")),
]
