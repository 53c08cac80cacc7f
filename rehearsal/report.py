"""The rehearsal's report: every gate's evidence and every invariant, checked at the end."""

from decimal import Decimal

from cutover.selectors import (
    open_discrepancy_count,
)
from ledger.selectors import ledger_integrity_checks
from onchain.models import Withdrawal
from rehearsal.runtime import latency_summary
from rehearsal.scenario import CURRENCIES, user_totals


class Report:
    # The report ------------------------------------------------------------------------------

    def _invariants(self) -> list[dict]:
        totals = user_totals()
        expected = {
            currency: self.opening[currency]
            + self.total.credited.get(currency, Decimal(0))
            - self.total.debited.get(currency, Decimal(0))
            + (self.onchain_net if currency == "USDC" else Decimal(0))
            for currency in CURRENCIES
        }
        checks = [
            {
                "name": c.name,
                "ok": c.ok,
                "detail": "; ".join(c.problems[:3]) or f"{c.checked} checked",
            }
            for c in ledger_integrity_checks()
        ]
        pre, lost, rollback = self.pre_shadow, self.treasury.get("lost_answer", {}), self.rollback
        usd = rollback["currencies"]["USD"]
        checks += [
            {
                "name": "drift_caught",
                "ok": self.drift_found == 1,
                "detail": f"{self.drift_found} difference found for 1 injected",
            },
            {
                "name": "conservation",
                "ok": all(
                    totals[c]["legacy"] == expected[c] == totals[c]["ledger"] for c in CURRENCIES
                ),
                "detail": "; ".join(
                    f"{c}: legacy {totals[c]['legacy']}, ledger {totals[c]['ledger']}, "
                    f"expected {expected[c]}"
                    for c in CURRENCIES
                ),
            },
            {
                "name": "rollback_rebuilt_legacy",
                "ok": self.rollback_differences == 0,
                "detail": f"{self.rollback_differences} users differ after the drill",
            },
            {
                "name": "rollback_kept_every_currency",
                "ok": usd["users"] > 0
                and rollback["dry_run_proof"] is True
                and rollback["dry_run_rows"] == rollback["rows_rebuilt"]
                and rollback["second_currency_credit"].startswith("refused")
                and all(
                    t["ledger_before"] == t["legacy_after"] == t["ledger_after"]
                    for t in rollback["currencies"].values()
                ),
                "detail": "; ".join(
                    f"{c} ({t['users']} users): ledger {t['ledger_before']} before, legacy "
                    f"{t['legacy_after']} and ledger {t['ledger_after']} after"
                    for c, t in rollback["currencies"].items()
                )
                + f"; dry run proved {rollback['dry_run_rows']} rows, the drill rebuilt "
                f"{rollback['rows_rebuilt']}; a USD credit to a USDC user in cutover "
                f"{rollback['second_currency_credit'].split(':')[0]}",
            },
            {
                "name": "pre_shadow_money_withdrawn",
                "ok": pre.get("requested_in") == "legacy"
                and pre.get("status_in_legacy") == "submitted"
                and pre.get("completed_in") == "shadow"
                and pre.get("status") == "completed"
                and pre.get("pending_after") == pre.get("pending_before")
                and Decimal(pre["buffer_before"]) - Decimal(pre["buffer_after"])
                == Decimal(pre["amount"])
                and pre.get("notifications_unsettled") == 0
                and not Withdrawal.objects.filter(status__in=["pending", "submitted"]).exists(),
                "detail": f"{pre.get('amount')} USDC requested and sent in "
                f"{pre.get('requested_in')}, {pre.get('status')} in {pre.get('completed_in')}; "
                f"withdrawals_pending_usdc {pre.get('pending_before')} -> "
                f"{pre.get('pending_held')} -> {pre.get('pending_after')}; usdc_buffer "
                f"{pre.get('buffer_before')} -> {pre.get('buffer_after')}; "
                f"{Withdrawal.objects.filter(status__in=['pending', 'submitted']).count()} "
                "withdrawals open at the end",
            },
            {
                "name": "onchain_exactly_once",
                "ok": all(
                    o["credits_once"] and o["withdrawals_settled"] and o["parked_resolved"] != "0"
                    for o in self.onchain
                ),
                "detail": "; ".join(
                    f"{o['phase']}: {o['withdrawals']} withdrawals of earlier money first "
                    f"({o['completed']} completed, {o['refused_by_circle']} refused, "
                    f"{o['failed_on_chain']} failed on chain), then {o['deposits']} deposits "
                    f"credited once ({o['redeliveries']} redeliveries, {o['credited_by_poll']} "
                    f"by the poll, {o['parked']} parked and resolved by the operator)"
                    for o in self.onchain
                ),
            },
            {
                "name": "treasury_restored_the_buffer",
                "ok": bool(self.treasury.get("restored")),
                "detail": f"USDC buffer {self.treasury.get('buffer_before')} -> "
                f"{self.treasury.get('buffer_low')} after withdrawals (minimum "
                f"{self.treasury.get('minimum')}) -> {self.treasury.get('buffer_after')} after "
                f"the cycle (target {self.treasury.get('target')})",
            },
            {
                "name": "conversion_with_lost_answer_booked_once",
                # Still open (not failed, not created again) until Due can be asked.
                "ok": lost.get("status_before_monitor") in ("pending", "timed_out")
                and lost.get("status") == "completed"
                and lost.get("conversions_at_due") == 1
                and lost.get("postings") == 1
                and bool(self.treasury.get("restored")),
                "detail": f"job {lost.get('job')}: {lost.get('status_before_monitor')} after "
                f"its submits ({lost.get('creations_sent')} transfer creations sent: the "
                "first accepted and its answer lost, then Due unavailable, so not sent again), "
                f"{lost.get('status')} after the monitor's look-up among Due's transfers; "
                f"{lost.get('conversions_at_due')} transfer of its amount at Due, "
                f"{lost.get('postings')} posting treasury/conversion:{lost.get('key')}; "
                f"USDC buffer {self.treasury.get('buffer_after')} (target "
                f"{self.treasury.get('target')})",
            },
            {
                "name": "custody_agrees",
                "ok": len(self.custody_reconciled) == len(CURRENCIES)
                and all(r["agrees"] for r in self.custody_reconciled),
                "detail": "; ".join(
                    f"{r['currency']}: ledger {r['ledger']}, {r['source']} reports {r['reported']}"
                    for r in self.custody_reconciled
                ),
            },
            {
                "name": "no_open_discrepancies",
                "ok": open_discrepancy_count() == 0,
                "detail": f"{open_discrepancy_count()} open",
            },
        ]
        return checks

    def _report(self) -> dict:
        checks = self._invariants()
        return {
            "users": self.users,
            "users_by_currency": {
                c: sum(1 for held in self.currency_of.values() if held == c) for c in CURRENCIES
            },
            "workers": self.workers,
            "stages": [stage.as_dict() for stage in self.stages],
            "gates": self.gates,
            "all_traffic": {
                "operations": self.total.operations,
                "applied": self.total.applied,
                "replays": self.total.replays,
                **latency_summary(self.total.latencies_ms),
            },
            "custody_opened": self.custody,
            "custody_reconciled": self.custody_reconciled,
            "pre_shadow_withdrawal": self.pre_shadow,
            "onchain": self.onchain,
            "treasury": self.treasury,
            "rollback": self.rollback,
            "invariants": checks,
            "ok": all(check["ok"] for check in checks),
        }
