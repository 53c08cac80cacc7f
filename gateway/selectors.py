"""Reads of the HTTP edge: the API client a bearer token names."""

import hashlib

from gateway.models import ApiClient


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def api_client_authenticate(*, token: str) -> ApiClient | None:
    return ApiClient.objects.filter(token_sha256=token_digest(token), active=True).first()
