"""The USDC buffer's alert: an ALERT log line when the buffer goes below
ONCHAIN_BUFFER_ALERT_THRESHOLD and a line when it is back, once per change however often it is
looked at (the console's banner on every admin page, /internal/onchain/buffer-status)."""

import logging

from cutover.alerts import alert_state_change
from onchain.selectors import BufferStatus, buffer_status

log = logging.getLogger(__name__)
BUFFER_ALERT = "onchain_usdc_buffer_below_threshold"


def buffer_status_observe() -> BufferStatus:
    """The USDC buffer against its alert threshold (onchain.selectors.buffer_status), logging
    the alert when this observation changed its state."""
    status = buffer_status()
    if alert_state_change(name=BUFFER_ALERT, firing=status.below_threshold):
        if status.below_threshold:
            log.warning(
                "ALERT onchain USDC buffer %s below the alert threshold %s",
                status.balance,
                status.alert_threshold,
            )
        else:
            log.info(
                "onchain USDC buffer %s back at or above the alert threshold %s",
                status.balance,
                status.alert_threshold,
            )
    return status
