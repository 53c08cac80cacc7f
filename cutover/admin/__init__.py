"""The operators' console for the migration. Nothing here writes a model directly: every change
goes through the cutover services, which check permissions and write the audit trail."""

from cutover.admin import discrepancies, phase, records

__all__ = ["discrepancies", "phase", "records"]
