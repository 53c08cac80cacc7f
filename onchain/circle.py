"""Circle's HTTP API, as far as the engine uses it, over real HTTP (urllib)."""

import json
import urllib.error
import urllib.request
from urllib.parse import quote

from django.conf import settings

from onchain.exceptions import CircleUnavailable, UnknownSigningKey


def public_key_fetch(key_id: str) -> tuple[str, str]:
    """(algorithm, base64 DER public key) of a notification-signing key."""
    request = urllib.request.Request(  # noqa: S310 (settings allow only http and https)
        f"{settings.CIRCLE_API_BASE_URL}/v2/notifications/publicKey/{quote(key_id, safe='')}",
        headers={
            "Authorization": f"Bearer {settings.CIRCLE_API_KEY}",
            "Accept": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=settings.CIRCLE_HTTP_TIMEOUT) as response:  # noqa: S310
            data = json.loads(response.read())["data"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise UnknownSigningKey(f"Circle does not know the key id {key_id}") from None
        raise CircleUnavailable(f"Circle answered {exc.code} for key {key_id}") from None
    except (urllib.error.URLError, TimeoutError, ValueError, KeyError) as exc:
        raise CircleUnavailable(f"Circle's public key endpoint failed: {exc}") from None
    return data["algorithm"], data["publicKey"]
