"""Operators' actions on the HTTP edge: an API client issued, audited in the same
transaction."""

from decimal import Decimal
from uuid import UUID

from django.db import transaction

from cutover.actors import Actor
from cutover.operator_audit import operator_action_record
from gateway.models import ApiClient
from gateway.services import api_client_create


def api_client_issue(
    *,
    name: str,
    scopes: list[str],
    actor: Actor,
    user_id: UUID | None = None,
    max_amount: Decimal | None = None,
    daily_limit: Decimal | None = None,
    reason: str = "",
) -> tuple[ApiClient, str]:
    """gateway.services.api_client_create (the client and its bearer token, shown once),
    audited: both are committed, or neither."""
    with transaction.atomic():
        client, token = api_client_create(
            name=name,
            scopes=scopes,
            user_id=user_id,
            max_amount=max_amount,
            daily_limit=daily_limit,
        )
        operator_action_record(
            actor=actor,
            action="api_client.create",
            target=f"api_client:{client.pk}",
            before={},
            after={
                "name": name,
                "user_id": str(user_id) if user_id else None,
                "scopes": client.scopes,
                "max_amount": str(max_amount) if max_amount is not None else None,
                "daily_limit": str(daily_limit) if daily_limit is not None else None,
            },
            reason=reason,
        )
    return client, token
