"""Circle's webhook: a thin view over onchain.services.notification_receive."""

import hmac
import logging
from decimal import Decimal

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from cutover.exceptions import CutoverError
from onchain import metrics
from onchain.exceptions import (
    CircleUnavailable,
    MalformedNotification,
    SignatureRejected,
    UnknownSigningKey,
)
from onchain.services import buffer_status, notification_receive

log = logging.getLogger("onchain.webhook")


def _refuse(status: int, code: str, message: str, field: str | None = None) -> JsonResponse:
    metrics.webhook_received.labels(outcome=code).inc()
    log.warning("circle webhook refused: %s %s", code, message)
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    return JsonResponse({"error": error}, status=status)


@csrf_exempt
@require_http_methods(["HEAD", "POST"])
def circle_transfers(request: HttpRequest) -> HttpResponse:
    if request.method == "HEAD":  # Circle checks the endpoint answers before subscribing it
        return HttpResponse(status=200)
    # CIRCLE_WEBHOOK_SECRET, when set, is a token in the subscriber URL registered with Circle
    # (`.../webhooks/circle/transfers?token=<secret>`), checked before anything else so that
    # strangers cannot make us fetch signing keys. It is an extra gate, never a substitute:
    # the signature is verified on every delivery either way.
    secret = settings.CIRCLE_WEBHOOK_SECRET
    if secret and not hmac.compare_digest(request.GET.get("token", ""), secret):
        return _refuse(401, "bad_token", "the subscriber URL's token is missing or wrong", "token")
    if len(request.body) > settings.CIRCLE_WEBHOOK_MAX_BYTES:
        return _refuse(413, "too_large", f"over {settings.CIRCLE_WEBHOOK_MAX_BYTES} bytes")
    try:
        delivery = notification_receive(
            body=request.body,
            signature=request.headers.get("X-Circle-Signature", ""),
            key_id=request.headers.get("X-Circle-Key-Id", ""),
        )
    except SignatureRejected as exc:
        return _refuse(401, "bad_signature", str(exc), "X-Circle-Signature")
    except UnknownSigningKey as exc:
        return _refuse(400, "unknown_key", str(exc), "X-Circle-Key-Id")
    except MalformedNotification as exc:
        return _refuse(400, "malformed", str(exc))
    except CircleUnavailable as exc:
        return _refuse(503, "circle_unavailable", str(exc))
    except CutoverError as exc:  # stored, failed, retryable: Circle's redelivery retries it
        return _refuse(503, "not_applied", str(exc))
    return JsonResponse(
        {
            "notificationId": delivery.notification_id,
            "status": delivery.status,
            "duplicate": delivery.duplicate,
        }
    )


@require_GET
def buffer_status_view(request: HttpRequest) -> JsonResponse:
    """Bearer ADMIN_TOKEN: the USDC buffer against its alert threshold."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return JsonResponse(
            {
                "error": {
                    "code": "unauthenticated",
                    "field": "Authorization",
                    "message": "send Authorization: Bearer <ADMIN_TOKEN>",
                }
            },
            status=401,
        )
    if not settings.ADMIN_TOKEN or not hmac.compare_digest(token.strip(), settings.ADMIN_TOKEN):
        return JsonResponse(
            {
                "error": {
                    "code": "forbidden",
                    "field": "Authorization",
                    "message": "the token is not the admin token",
                }
            },
            status=403,
        )
    status = buffer_status()
    return JsonResponse(
        {
            "currency": status.currency,
            "balance": str(status.balance.quantize(Decimal("0.000001"))),
            "alert_threshold": str(status.alert_threshold),
            "below_threshold": status.below_threshold,
        }
    )
