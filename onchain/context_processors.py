"""The console's alert banner while the USDC buffer is below its alert threshold (logged when
that changes, not at every page)."""

from django.http import HttpRequest

from onchain.buffer_alert import buffer_status_observe


def buffer_alert(request: HttpRequest) -> dict:
    if not request.path.startswith("/admin/") or not getattr(request.user, "is_staff", False):
        return {}
    status = buffer_status_observe()
    return {"onchain_buffer_alert": status if status.below_threshold else None}
