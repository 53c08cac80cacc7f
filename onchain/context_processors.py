"""The console's alert banner when the USDC buffer is below its alert threshold."""

from django.http import HttpRequest

from onchain.selectors import buffer_status


def buffer_alert(request: HttpRequest) -> dict:
    if not request.path.startswith("/admin/") or not getattr(request.user, "is_staff", False):
        return {}
    status = buffer_status()
    return {"onchain_buffer_alert": status if status.below_threshold else None}
