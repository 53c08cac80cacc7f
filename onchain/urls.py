from django.urls import path

from onchain import views

urlpatterns = [
    path("webhooks/circle/transfers", views.circle_transfers, name="circle-transfers"),
    path(
        "api/v1/users/<str:user_id>/withdrawals", views.withdrawal_create, name="withdrawal-create"
    ),
    path(
        "api/v1/users/<str:user_id>/deposit-addresses",
        views.deposit_addresses,
        name="deposit-addresses",
    ),
    path("internal/onchain/buffer-status", views.buffer_status_view, name="onchain-buffer-status"),
]
