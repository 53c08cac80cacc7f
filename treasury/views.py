"""The treasury's endpoints: an operator's cycle on demand, and the provider's callbacks."""

import dataclasses
import logging

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from gateway.api import ApiError, admin_token_refusal
from gateway.boundary import body_read
from gateway.exceptions import InputRefused
from gateway.faults import fault_point
from ledger.exceptions import LedgerError
from treasury.cycle import settlement_cycle_run
from treasury.exceptions import (
    CallbackRejected,
    DueUnavailable,
    JobRefused,
    ProviderNotConfigured,
)
from treasury.settlement import callback_receive
from treasury.submission import jobs_submit

log = logging.getLogger("treasury.api")
# A transfer event is a few kilobytes at most; more is not one of Due's webhooks.
MAX_CALLBACK_BYTES = 65536


@csrf_exempt
@require_POST
def trigger_cycle(request: HttpRequest) -> JsonResponse:
    """Bearer ADMIN_TOKEN: one settlement cycle now (skipped if one is running), then the
    submission of what it created."""
    refusal = admin_token_refusal(request)
    if refusal is not None:
        return refusal
    result = settlement_cycle_run(triggered_by="api")
    if result.skipped:  # a refusal like any other: our error body, the state refuses
        error = ApiError(409, "cycle_running", result.skipped)
        return JsonResponse(error.body(), status=error.status)
    body = dataclasses.asdict(result)
    body["submitted"] = dataclasses.asdict(jobs_submit())
    return JsonResponse(body)


@csrf_exempt
@require_POST
def due_callback(request: HttpRequest) -> JsonResponse:
    """Due's webhook (Ed25519-signed); what it says of a job's transfer is asked of Due again
    before it is applied, so duplicates and replays change nothing."""
    try:
        status = callback_receive(
            body=body_read(request, limit=MAX_CALLBACK_BYTES),
            signature=request.headers.get("X-Webhook-Signature", ""),
        )
    except InputRefused as exc:
        error = ApiError(exc.status, exc.code, str(exc), exc.field)
        return JsonResponse(error.body(), status=error.status)
    except CallbackRejected as exc:
        log.warning("due webhook refused: %s", exc)
        return JsonResponse(
            {"error": {"code": "rejected", "message": str(exc), "field": exc.field}},
            status=400,
        )
    except JobRefused as exc:  # the job's rules refused the change: retrying cannot help
        log.error("ALERT treasury: due webhook not applied: %s", exc)
        error = ApiError(409, "refused", str(exc), getattr(exc, "field", None))
        return JsonResponse(error.body(), status=error.status)
    except (DueUnavailable, ProviderNotConfigured) as exc:  # Due's redelivery will find us ready
        log.warning("due webhook not applied now: %s", exc)
        error = ApiError(503, "provider_unavailable", str(exc))
        return JsonResponse(error.body(), status=error.status)
    except LedgerError as exc:  # nothing applied; the provider's retry or the monitor settles it
        return JsonResponse({"error": {"code": "not_applied", "message": str(exc)}}, status=503)
    fault_point("webhook:due-settled")
    return JsonResponse({"status": status})
