"""Circle's signing keys and the verification of its notifications' signatures (the v2
scheme: base64 ECDSA-SHA256 over the raw body); a key is fetched once, then kept by the
process; a key id Circle does not know is not asked for again for CIRCLE_UNKNOWN_KEY_TTL."""

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from django.conf import settings
from django.utils import timezone

from gateway.boundary import printable_ascii
from onchain import circle
from onchain.exceptions import CircleUnavailable, SignatureRejected, UnknownSigningKey
from onchain.models import CirclePublicKey, CircleUnknownKey

ALGORITHM = "ECDSA_SHA_256"


# Loaded signing keys by key id. Circle's keys never change under an id, so a process keeps
# what it loaded: one fetch per unknown id (table first, then Circle), then no query at all.
_KEYS: dict[str, ec.EllipticCurvePublicKey] = {}
MAX_ID_LENGTH = 64


def _public_key(key_id: str, base_url: str):
    """The signing key, from this process, the table, or fetched from Circle once. Circle's
    404 is remembered (in the database: every worker process reads it) and answered without
    asking again until CIRCLE_UNKNOWN_KEY_TTL has passed; a timeout or 5xx is not."""
    if key_id in _KEYS:
        return _KEYS[key_id]
    # Circle's key ids are UUIDs: anything else is refused before it is looked up, fetched or
    # remembered (a NUL would not even reach PostgreSQL).
    if not printable_ascii(key_id, max_length=MAX_ID_LENGTH):
        raise UnknownSigningKey(
            f"key id must be 1..{MAX_ID_LENGTH} printable ASCII characters without spaces"
        )
    known = CirclePublicKey.objects.filter(key_id=key_id).first()
    if known is None:
        algorithm, public_key = _public_key_fetch(key_id, base_url)
        if algorithm == ALGORITHM:
            _key_load(key_id, public_key)  # kept only once it is a key we can verify with
        known, _ = CirclePublicKey.objects.get_or_create(
            key_id=key_id, defaults={"algorithm": algorithm, "public_key": public_key}
        )
    if known.algorithm != ALGORITHM:
        raise SignatureRejected(f"key {key_id} uses {known.algorithm}, not {ALGORITHM}")
    try:
        _KEYS[key_id] = _key_load(key_id, known.public_key)
    except CircleUnavailable:  # kept before its answer was checked: fetched again next time
        CirclePublicKey.objects.filter(key_id=key_id).delete()
        raise
    return _KEYS[key_id]


def _key_load(key_id: str, public_key: str) -> ec.EllipticCurvePublicKey:
    """Circle's answer for an ECDSA key as a key: base64 of a DER EC public key. Anything else
    is Circle's answer gone wrong (found from outside: a malformed answer was kept, and every
    later delivery signed by that key id was a 500): CircleUnavailable, a 503 that Circle's
    redelivery retries, nothing kept."""
    try:
        key = load_der_public_key(base64.b64decode(public_key, validate=True))
    except (binascii.Error, ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CircleUnavailable(f"Circle's public key for {key_id} is not an EC public key")
    return key


def _public_key_fetch(key_id: str, base_url: str) -> tuple[str, str]:
    now = timezone.now()
    expired = now - settings.CIRCLE_UNKNOWN_KEY_TTL
    if CircleUnknownKey.objects.filter(key_id=key_id, checked_at__gt=expired).exists():
        raise UnknownSigningKey(f"Circle does not know the key id {key_id}")
    try:
        return circle.public_key_fetch(base_url=base_url, key_id=key_id)
    except UnknownSigningKey:
        # Made-up ids would each leave a row: the expired ones go as new ones come.
        CircleUnknownKey.objects.filter(checked_at__lte=expired).delete()
        CircleUnknownKey.objects.bulk_create(
            [CircleUnknownKey(key_id=key_id, checked_at=now)],
            update_conflicts=True,
            unique_fields=["key_id"],
            update_fields=["checked_at"],
        )
        raise


def signature_verify(*, body: bytes, signature: str, key_id: str, base_url: str) -> None:
    """Circle's v2 scheme: base64 ECDSA-SHA256 over the raw body, by the key `key_id` (fetched
    from Circle at `base_url` the first time)."""
    if not signature or not key_id:
        raise SignatureRejected("X-Circle-Signature and X-Circle-Key-Id are required")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureRejected("X-Circle-Signature is not base64") from None
    try:
        _public_key(key_id, base_url).verify(raw_signature, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureRejected("the signature does not match the body") from None
