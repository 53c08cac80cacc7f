"""Circle Mint v1 notifications, delivered by Amazon SNS to our webhook: the SNS envelope read,
its topic and URLs checked, its signature verified, then the Circle JSON it carries (`Message`)
handed to the inbox as `sns:<MessageId>` (SNS reuses the MessageId when it retries, so a
redelivery is deduplicated). A subscription confirmation is confirmed by a GET of its
SubscribeURL; an unsubscribe confirmation is recorded and alerted, never resubscribed.

What is checked, before anything is fetched: the TopicArn is one of CIRCLE_SNS_TOPIC_ARNS; the
SigningCertURL (and a confirmation's SubscribeURL) is `scheme://host[:port]` fullmatching
CIRCLE_SNS_URL_PATTERN, and the certificate's path ends in `.pem`. The certificate (PEM X.509,
RSA) is then fetched once per URL and kept by the process, each new URL within the budget of
onchain.signatures.signing_fetch_claim; a URL that failed for good (4xx, not a PEM certificate,
not RSA) is answered the same, without fetching, for CIRCLE_UNKNOWN_KEY_TTL (in the database).
SignatureVersion "1" is RSA PKCS#1 v1.5 with SHA1, "2" with SHA256.

The string to sign is AWS's canonical form: for a Notification the keys Message, MessageId,
Subject (only when present), Timestamp, TopicArn, Type; for a SubscriptionConfirmation or an
UnsubscribeConfirmation Message, MessageId, SubscribeURL, Timestamp, Token, TopicArn, Type;
each written `Key\\nValue\\n`, in that order. Read on 2026-12-01 in AWS's own validators:
github:aws/aws-php-sns-message-validator, src/MessageValidator.php at 01f1049
(`getStringToSign`: every present key of Message, MessageId, Subject, SubscribeURL, Timestamp,
Token, TopicArn, Type, as "{key}\\n{value}\\n"; version "1" OPENSSL_ALGO_SHA1, else SHA256;
src/Message.php requires SubscribeURL and Token of both confirmation types), and
github:aws/aws-js-sns-message-validator, index.js at a6ba4d6 (the same order and separator;
it signs an UnsubscribeConfirmation with the notification's keys, without Token: the PHP
validator and AWS's documentation include the Token, as we do).
"""

import base64
import binascii
import hashlib
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from gateway import boundary
from gateway.exceptions import InputRefused
from onchain import metrics
from onchain.exceptions import SnsMalformed, SnsRejected, SnsUnavailable
from onchain.inbox import Delivery, notification_accept
from onchain.models import CircleNotification, InboxStatus, SnsCertificateFailure
from onchain.signatures import FETCH_BUDGET_SPENT, MAX_ID_LENGTH, signing_fetch_claim

log = logging.getLogger(__name__)

NOTIFICATION = "Notification"
SUBSCRIBE = "SubscriptionConfirmation"
UNSUBSCRIBE = "UnsubscribeConfirmation"
REQUIRED = (
    "Type",
    "MessageId",
    "TopicArn",
    "Message",
    "Timestamp",
    "SignatureVersion",
    "Signature",
    "SigningCertURL",
)
CONFIRMATION_KEYS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
SIGNED_KEYS = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIBE: CONFIRMATION_KEYS,
    UNSUBSCRIBE: CONFIRMATION_KEYS,
}
SIGNATURE_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}
# The inbox id is `sns:<MessageId>` (SNS's MessageIds are UUIDs).
PREFIX = "sns:"
MAX_MESSAGE_ID_LENGTH = MAX_ID_LENGTH - len(PREFIX)
# SNS's certificates are about 2 KB; an answer over this is not one.
MAX_CERTIFICATE_BYTES = 65536

# Signing keys by certificate URL. A certificate never changes under its URL (AWS rotates
# certificates by publishing new URLs), so a process fetches each one once.
_CERTIFICATE_KEYS: dict[str, rsa.RSAPublicKey] = {}
# Answers that no retry changes: the URL names nothing (remembered, unlike 408, 429 or 5xx),
# or sends us elsewhere (a redirect is never followed: _NoRedirect).
NOT_SERVED = (frozenset(range(400, 500)) - {408, 429}) | {301, 302, 303, 307, 308}


class _NotServed(SnsUnavailable):
    """SNS's host answered one of NOT_SERVED: a 503 as any SnsUnavailable, but remembered."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is not followed: its target is a host CIRCLE_SNS_URL_PATTERN never allowed
    (an open redirect on an SNS host would have a certificate of anyone's accepted). The 3xx
    is an HTTPError, a failed fetch."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# urlopen's opener (proxies from the environment, http and https), without redirects.
_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True)
class SnsSubscription:
    """A verified subscription or unsubscribe confirmation, as recorded in the inbox."""

    message_id: str
    message_type: str
    topic_arn: str
    duplicate: bool


def sns_receive(*, body: bytes) -> Delivery | SnsSubscription:
    """An SNS delivery (the raw body): refused unless it comes from a topic of ours and its
    signature verifies by a certificate from SNS's hosts. A Notification's Circle message is
    accepted by the inbox (notification_accept); a confirmation is recorded (SnsSubscription),
    a subscription confirmed first."""
    envelope = _envelope(body)
    message_type = envelope["Type"]
    if envelope["SignatureVersion"] not in SIGNATURE_HASHES:
        raise SnsRejected(
            "SignatureVersion", f"SignatureVersion must be one of {', '.join(SIGNATURE_HASHES)}"
        )
    if envelope["TopicArn"] not in settings.CIRCLE_SNS_TOPIC_ARNS:
        raise SnsRejected("TopicArn", f"topic {envelope['TopicArn']} is not one of ours")
    certificate_url = _sns_url(envelope, "SigningCertURL")
    if not urlsplit(certificate_url).path.endswith(".pem"):
        raise SnsRejected("SigningCertURL", "SigningCertURL is not a .pem certificate")
    # A confirmation's URL is checked before anything is fetched (it is only ever visited).
    subscribe_url = _sns_url(envelope, "SubscribeURL") if message_type == SUBSCRIBE else None
    _signature_verify(envelope, certificate_url)
    if message_type == NOTIFICATION:
        return notification_accept(
            notification_id=PREFIX + envelope["MessageId"], key_id="sns", text=envelope["Message"]
        )
    return _subscription_record(envelope, body.decode("utf-8"), subscribe_url)


def _envelope(body: bytes) -> dict[str, str]:
    """SNS's JSON envelope, its required fields (by type) strings. Parsed before any signature
    can be checked, so through the input boundary: text PostgreSQL cannot store (or SNS could
    not have signed, an unpaired surrogate) is refused here, naming the field."""
    try:
        envelope = boundary.json_object(body)
    except InputRefused as exc:
        raise SnsMalformed(exc.field, f"not an SNS message: {exc}") from None
    if not isinstance(envelope.get("Type"), str) or envelope["Type"] not in SIGNED_KEYS:
        raise SnsMalformed("Type", f"Type must be one of {', '.join(SIGNED_KEYS)}")
    required = (
        REQUIRED if envelope["Type"] == NOTIFICATION else (*REQUIRED, "SubscribeURL", "Token")
    )
    for field in required:
        if not isinstance(envelope.get(field), str) or not envelope[field]:
            raise SnsMalformed(field, f"{field} must be a non-empty string")
    if "Subject" in envelope and not isinstance(envelope["Subject"], str):
        raise SnsMalformed("Subject", "Subject must be a string")
    if len(envelope["MessageId"]) > MAX_MESSAGE_ID_LENGTH:
        raise SnsMalformed("MessageId", f"MessageId is over {MAX_MESSAGE_ID_LENGTH} characters")
    return envelope


def _sns_url(envelope: dict[str, str], field: str) -> str:
    """The envelope's URL `field` when its `scheme://host[:port]` fullmatches
    CIRCLE_SNS_URL_PATTERN, as it was checked (the one that is fetched)."""
    try:
        parts = urlsplit(envelope[field])
    except ValueError:
        raise SnsRejected(field, f"{field} is not a URL") from None
    origin = f"{parts.scheme}://{parts.netloc}"
    if not settings.CIRCLE_SNS_URL_PATTERN.fullmatch(origin):
        raise SnsRejected(field, f"{field} is not on an Amazon SNS host ({origin})")
    return urlunsplit(parts)


def _string_to_sign(envelope: dict[str, str]) -> bytes:
    keys = SIGNED_KEYS[envelope["Type"]]
    return "".join(f"{key}\n{envelope[key]}\n" for key in keys if key in envelope).encode()


def _signature_verify(envelope: dict[str, str], certificate_url: str) -> None:
    try:
        signature = base64.b64decode(envelope["Signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SnsRejected("Signature", "Signature is not base64") from None
    key = _certificate_key(certificate_url)
    algorithm = SIGNATURE_HASHES[envelope["SignatureVersion"]]()
    try:
        key.verify(signature, _string_to_sign(envelope), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise SnsRejected("Signature", "the signature does not match the message") from None


def _certificate_key(url: str) -> rsa.RSAPublicKey:
    """The RSA key of SNS's certificate at `url`, fetched once per process. Found from outside:
    a made-up path on an SNS host was fetched on every forged delivery. Now a URL that failed
    for good is answered from the database for CIRCLE_UNKNOWN_KEY_TTL, and a new URL is fetched
    only within the budget (over it, SnsUnavailable: SNS redelivers)."""
    key = _CERTIFICATE_KEYS.get(url)
    if key is not None:
        return key
    url_sha256 = hashlib.sha256(url.encode()).hexdigest()
    now = timezone.now()
    expired = now - settings.CIRCLE_UNKNOWN_KEY_TTL
    failed = SnsCertificateFailure.objects.filter(
        url_sha256=url_sha256, checked_at__gt=expired
    ).first()
    if failed is not None:
        if failed.rejected:
            raise SnsRejected("SigningCertURL", failed.error)
        raise SnsUnavailable(failed.error)
    if not signing_fetch_claim(source=url):
        raise SnsUnavailable(f"the signing certificate at {url} not fetched: {FETCH_BUDGET_SPENT}")
    try:
        key = _certificate_load(url)
    except (_NotServed, SnsRejected) as exc:
        # Made-up URLs would each leave a row: the expired ones go as new ones come.
        SnsCertificateFailure.objects.filter(checked_at__lte=expired).delete()
        SnsCertificateFailure.objects.bulk_create(
            [
                SnsCertificateFailure(
                    url_sha256=url_sha256,
                    url=url,
                    rejected=isinstance(exc, SnsRejected),
                    error=str(exc),
                    checked_at=now,
                )
            ],
            update_conflicts=True,
            unique_fields=["url_sha256"],
            update_fields=["rejected", "error", "checked_at"],
        )
        raise
    _CERTIFICATE_KEYS[url] = key
    return key


def _certificate_load(url: str) -> rsa.RSAPublicKey:
    pem = _get(url, what="the signing certificate")
    if len(pem) > MAX_CERTIFICATE_BYTES:
        raise SnsRejected(
            "SigningCertURL", f"the certificate is over {MAX_CERTIFICATE_BYTES} bytes"
        )
    try:
        key = x509.load_pem_x509_certificate(pem).public_key()
    except ValueError:
        raise SnsRejected("SigningCertURL", "SigningCertURL is not a PEM certificate") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise SnsRejected("SigningCertURL", "the signing certificate's key is not RSA")
    return key


def _get(url: str, *, what: str) -> bytes:
    """GET `url` (checked by _sns_url: http or https on an SNS host) within
    CIRCLE_HTTP_TIMEOUT: at most MAX_CERTIFICATE_BYTES + 1 bytes of its answer; SnsUnavailable
    on any failure (SNS redelivers), a redirect included (not followed: _NoRedirect)."""
    try:
        with _OPENER.open(url, timeout=settings.CIRCLE_HTTP_TIMEOUT) as response:
            answer = response.read(MAX_CERTIFICATE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # (its connection, not left to the garbage collector)
        unavailable = _NotServed if exc.code in NOT_SERVED else SnsUnavailable
        raise unavailable(f"{what} at {url}: answered {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as exc:
        raise SnsUnavailable(f"{what} at {url}: {exc}") from None
    return answer


def _subscription_record(
    envelope: dict[str, str], text: str, subscribe_url: str | None
) -> SnsSubscription:
    """Confirm a subscription (GET its SubscribeURL) or alert an unsubscription, and record
    it in the inbox (`sns:<MessageId>`, type `sns.<Type>`, processed). Its redelivery is
    counted and changes nothing else."""
    message_type, topic = envelope["Type"], envelope["TopicArn"]
    notification_id = PREFIX + envelope["MessageId"]
    if _redelivered(notification_id):
        return SnsSubscription(envelope["MessageId"], message_type, topic, duplicate=True)
    if subscribe_url is not None:
        _get(subscribe_url, what="the subscription's SubscribeURL")
        log.warning("circle sns: subscription to %s confirmed (%s)", topic, notification_id)
    else:
        # Circle (or someone with our AWS subscription) unsubscribed us: no Mint notification
        # comes through this topic any more. Resubscribing is an operator's decision.
        log.error(
            "ALERT circle sns: unsubscribed from %s (%s); Mint notifications stop coming from "
            "it; to resubscribe, an operator visits its SubscribeURL or registers again at Circle",
            topic,
            notification_id,
        )
    _, created = CircleNotification.objects.get_or_create(
        notification_id=notification_id,
        defaults={
            "notification_type": f"sns.{message_type}",
            "key_id": "sns",
            "body": text,
            "status": InboxStatus.PROCESSED,
            "attempts": 1,
            "processed_at": timezone.now(),
        },
    )
    if not created:
        _redelivered(notification_id)  # a concurrent delivery recorded it first
    metrics.webhook_received.labels(outcome=f"sns.{message_type}").inc()
    return SnsSubscription(envelope["MessageId"], message_type, topic, duplicate=not created)


def _redelivered(notification_id: str) -> bool:
    """Count a delivery of an already recorded message; False when it is new."""
    return bool(
        CircleNotification.objects.filter(notification_id=notification_id).update(
            deliveries=F("deliveries") + 1
        )
    )
