from django.urls import path

from treasury import views

urlpatterns = [
    path("internal/treasury/trigger-cycle", views.trigger_cycle, name="treasury-trigger-cycle"),
    path("webhooks/due/conversions", views.due_callback, name="due-callback"),
]
