"""The Circle sandbox's Amazon SNS, as it delivers Circle Mint v1 notifications: its own RSA key
and self-signed certificate served at `GET /SimpleNotificationService-<hex>.pem`, signed
envelopes (`sns_envelope`, `sns_confirmation`, `sns_unsubscribe_confirmation`), the
confirmation URL `GET /?Action=ConfirmSubscription&TopicArn=...&Token=...` (recorded in
`sns_confirmed`), and `deliver_sns` posting an envelope with SNS's headers. No bearer on these.
A mixin of onchain.sandbox.CircleSandbox (its lock, base_url and SNS state)."""

import base64
import functools
import json
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from gateway.sandbox import SandboxHandler


def sandbox_now() -> str:
    """Now as Circle and SNS write instants (ISO 8601, milliseconds, Z)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def answer_json(request: urllib.request.Request) -> tuple[int, dict]:
    """Send a delivery to the subscriber; its status and JSON answer (an error's too)."""
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def self_signed_certificate(key) -> bytes:
    """A PEM certificate for `key`'s public key, signed by `key`, valid from yesterday for a
    year, named as SNS's."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


class SnsSandbox:
    # Amazon SNS (Circle Mint v1) ----------------------------------------------------------
    # Circle Mint v1 notifications are published by Circle to an SNS topic, which delivers
    # them signed by SNS (RSA, a certificate fetched from SigningCertURL). Its string to sign
    # is written here from AWS's documentation, independently of onchain.sns.

    SNS_TOPIC_ARN = "arn:aws:sns:us-west-2:908968368384:sandbox_platform-notifications-topic"
    SNS_SIGNED_KEYS = {
        "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
        "SubscriptionConfirmation": (
            "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
        ),
        "UnsubscribeConfirmation": (
            "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
        ),
    }  # fmt: skip

    @functools.cached_property
    def sns_signer(self) -> tuple[rsa.RSAPrivateKey, bytes, str]:
        """SNS's signing key, its self-signed certificate (PEM) and the certificate's path,
        made on first use (an RSA key takes a while)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self_signed_certificate(key)
        return key, pem, f"/SimpleNotificationService-{uuid.uuid4().hex}.pem"

    @property
    def sns_certificate_url(self) -> str:
        return self.base_url + self.sns_signer[2]

    def sns_sign(self, envelope: dict) -> dict:
        """Sign `envelope` in place as SNS does (by its SignatureVersion: "1" SHA1, "2"
        SHA256, RSA PKCS#1 v1.5); the envelope."""
        text = "".join(
            f"{key}\n{envelope[key]}\n"
            for key in self.SNS_SIGNED_KEYS[envelope["Type"]]
            if key in envelope
        )
        algorithm = hashes.SHA1() if envelope["SignatureVersion"] == "1" else hashes.SHA256()  # noqa: S303 (SNS's version 1)
        signature = self.sns_signer[0].sign(text.encode(), padding.PKCS1v15(), algorithm)
        envelope["Signature"] = base64.b64encode(signature).decode()
        return envelope

    def sns_envelope(
        self,
        message: dict | str,
        *,
        topic_arn: str = SNS_TOPIC_ARN,
        message_id: str | None = None,
        signature_version: str = "2",
    ) -> dict:
        """SNS's Notification carrying `message` (Circle's JSON, compact, as Circle writes
        it), signed."""
        if not isinstance(message, str):
            message = json.dumps(message, separators=(",", ":"))
        return self.sns_sign(
            {
                "Type": "Notification",
                "MessageId": message_id or str(uuid.uuid4()),
                "TopicArn": topic_arn,
                "Message": message,
                "Timestamp": sandbox_now(),
                "SignatureVersion": signature_version,
                "Signature": "",
                "SigningCertURL": self.sns_certificate_url,
                "UnsubscribeURL": f"{self.base_url}/?Action=Unsubscribe&SubscriptionArn="
                f"{topic_arn}:{uuid.uuid4()}",
            }
        )

    def sns_confirmation(self, topic_arn: str = SNS_TOPIC_ARN) -> dict:
        """SNS's SubscriptionConfirmation for `topic_arn`, signed; its SubscribeURL confirms
        on this sandbox."""
        return self._sns_control(
            "SubscriptionConfirmation",
            topic_arn,
            f"You have chosen to subscribe to the topic {topic_arn}.\nTo confirm the "
            "subscription, visit the SubscribeURL included in this message.",
        )

    def sns_unsubscribe_confirmation(self, topic_arn: str = SNS_TOPIC_ARN) -> dict:
        """SNS's UnsubscribeConfirmation for `topic_arn`, signed; its SubscribeURL would
        resubscribe."""
        return self._sns_control(
            "UnsubscribeConfirmation",
            topic_arn,
            f"You have chosen to deactivate subscription {topic_arn}:{uuid.uuid4()}.\nTo "
            "cancel this operation and restore the subscription, visit the SubscribeURL "
            "included in this message.",
        )

    def _sns_control(self, message_type: str, topic_arn: str, message: str) -> dict:
        token = uuid.uuid4().hex * 4
        with self.lock:
            self.sns_tokens[token] = topic_arn
        return self.sns_sign(
            {
                "Type": message_type,
                "MessageId": str(uuid.uuid4()),
                "Token": token,
                "TopicArn": topic_arn,
                "Message": message,
                "SubscribeURL": f"{self.base_url}/?Action=ConfirmSubscription&TopicArn="
                f"{quote(topic_arn, safe=':')}&Token={token}",
                "Timestamp": sandbox_now(),
                "SignatureVersion": "1",
                "Signature": "",
                "SigningCertURL": self.sns_certificate_url,
            }
        )

    def sns_get(self, handler: SandboxHandler) -> bool:
        """Answer SNS's own GETs (the certificate, a subscription's confirmation); False for
        any other request."""
        url = urlsplit(handler.path)
        query = parse_qs(url.query)
        if url.path.startswith("/SimpleNotificationService-"):
            if url.path != self.sns_signer[2]:
                self._sns_answer(handler, 404, "text/plain", b"Not Found")
                return True
            with self.lock:
                self.sns_certificate_fetches += 1
            self._sns_answer(handler, 200, "application/x-pem-file", self.sns_signer[1])
            return True
        if url.path != "/" or query.get("Action") != ["ConfirmSubscription"]:
            return False
        topic_arn, token = query.get("TopicArn", [""])[0], query.get("Token", [""])[0]
        with self.lock:
            known = self.sns_tokens.get(token) == topic_arn
            if known:
                self.sns_confirmed.append({"TopicArn": topic_arn, "Token": token})
        if not known:
            self._sns_answer(handler, 404, "text/xml", b"<ErrorResponse>NotFound</ErrorResponse>")
            return True
        answer = (
            "<ConfirmSubscriptionResponse><ConfirmSubscriptionResult><SubscriptionArn>"
            f"{topic_arn}:{uuid.uuid4()}</SubscriptionArn></ConfirmSubscriptionResult>"
            "</ConfirmSubscriptionResponse>"
        )
        self._sns_answer(handler, 200, "text/xml", answer.encode())
        return True

    @staticmethod
    def _sns_answer(handler: SandboxHandler, status: int, content_type: str, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def deliver_sns(url: str, envelope: dict | bytes) -> tuple[int, dict]:
        """POST an SNS message as SNS does (its headers, text/plain); the response. Bytes are
        posted as they are, as a Notification (a malformed delivery)."""
        fields = envelope if isinstance(envelope, dict) else {}
        body = json.dumps(envelope).encode() if isinstance(envelope, dict) else envelope
        request = urllib.request.Request(  # noqa: S310 (the subscriber's http URL)
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "text/plain; charset=UTF-8",
                "x-amz-sns-message-type": str(fields.get("Type", "Notification")),
                "x-amz-sns-message-id": str(fields.get("MessageId", "")),
                "x-amz-sns-topic-arn": str(fields.get("TopicArn", "")),
                "User-Agent": "Amazon Simple Notification Service Agent",
            },
        )
        return answer_json(request)
