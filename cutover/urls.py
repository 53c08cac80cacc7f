from django.urls import path

from cutover import views

urlpatterns = [
    path("api/v1/users/<str:user_id>/balance", views.balance_detail, name="balance-detail"),
    path(
        "api/v1/users/<str:user_id>/balance-mutations",
        views.balance_mutation_create,
        name="balance-mutation-create",
    ),
]
