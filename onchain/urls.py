from django.urls import path

from onchain import views

urlpatterns = [
    path("webhooks/circle/transfers", views.circle_transfers, name="circle-transfers"),
    path("internal/onchain/buffer-status", views.buffer_status_view, name="onchain-buffer-status"),
]
