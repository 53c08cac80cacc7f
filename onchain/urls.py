from django.urls import path

from onchain import views

urlpatterns = [
    path("webhooks/circle/transfers", views.circle_transfers, name="circle-transfers"),
]
