"""Circle's signing keys and the verification of its notifications' signatures (the v2
scheme: base64 ECDSA-SHA256 over the raw body); a key is fetched once, then kept by the
process; a key id Circle does not know is not asked for again for CIRCLE_UNKNOWN_KEY_TTL.
Fetches of signing material we do not hold (these keys, SNS's certificates) share one budget,
CIRCLE_KEY_FETCHES_PER_MINUTE, across every worker process (signing_fetch_claim)."""

import base64
import binascii
import logging

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from cutover.locks import SIGNING_FETCH_LOCK
from gateway.boundary import printable_ascii
from onchain import circle
from onchain.exceptions import CircleUnavailable, SignatureRejected, UnknownSigningKey
from onchain.models import CirclePublicKey, CircleUnknownKey, SigningFetch

log = logging.getLogger(__name__)

ALGORITHM = "ECDSA_SHA_256"
FETCH_BUDGET_SPENT = (
    "the budget of fetches of signing material we do not hold (CIRCLE_KEY_FETCHES_PER_MINUTE) "
    "is spent; try again later"
)


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
    # Found from outside: a fresh made-up key id on every forged delivery was a call to Circle
    # each time, with our API key (whose rate limit withdrawals and polls need).
    if not signing_fetch_claim(source=key_id):
        raise CircleUnavailable(f"key id {key_id} not fetched: {FETCH_BUDGET_SPENT}")
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


def signing_fetch_claim(*, source: str) -> bool:
    """Count one fetch of signing material we do not hold (`source`: a key id, a certificate
    URL) against CIRCLE_KEY_FETCHES_PER_MINUTE per CIRCLE_KEY_FETCH_WINDOW, shared by every
    worker process; False, and a warning, when the budget is spent. Counted and recorded under
    a transaction-level advisory lock (so concurrent deliveries cannot each pass), released
    before the caller fetches."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SIGNING_FETCH_LOCK])
        window = settings.CIRCLE_KEY_FETCH_WINDOW
        SigningFetch.objects.filter(fetched_at__lte=Now() - window).delete()
        spent = SigningFetch.objects.count() >= settings.CIRCLE_KEY_FETCHES_PER_MINUTE
        if not spent:
            SigningFetch.objects.create(source=source)
    if spent:
        log.warning(
            "%s (%d per %s): %s not fetched",
            FETCH_BUDGET_SPENT,
            settings.CIRCLE_KEY_FETCHES_PER_MINUTE,
            window,
            source,
        )
    return not spent


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
