-- Withdrawals move only along legal transitions; a finished withdrawal never changes again.
-- OC001: an illegal transition (mapped in onchain/exceptions.py).
--   pending   -> submitted | completed | failed | dead   (and pending -> pending: a retry noted)
--   submitted -> completed | failed                      (and submitted -> submitted)
--   dead      -> pending (an operator resends) | failed (an operator reverses the hold)
CREATE OR REPLACE FUNCTION onchain_withdrawal_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (
        (OLD.status = 'pending' AND NEW.status IN ('pending', 'submitted', 'completed', 'failed', 'dead'))
        OR (OLD.status = 'submitted' AND NEW.status IN ('submitted', 'completed', 'failed'))
        OR (OLD.status = 'dead' AND NEW.status IN ('pending', 'failed'))
    ) THEN
        RAISE EXCEPTION 'withdrawal %: % -> % is not a legal transition', OLD.idempotency_key,
            OLD.status, NEW.status USING ERRCODE = 'OC001';
    END IF;
    IF (NEW.user_id, NEW.amount, NEW.currency, NEW.address, NEW.chain, NEW.idempotency_key,
        NEW.hold_in_ledger)
       IS DISTINCT FROM (OLD.user_id, OLD.amount, OLD.currency, OLD.address, OLD.chain,
                         OLD.idempotency_key, OLD.hold_in_ledger) THEN
        RAISE EXCEPTION 'withdrawal %: what was held cannot change', OLD.idempotency_key
            USING ERRCODE = 'OC001';
    END IF;
    IF OLD.circle_transfer_id IS NOT NULL
       AND NEW.circle_transfer_id IS DISTINCT FROM OLD.circle_transfer_id THEN
        RAISE EXCEPTION 'withdrawal %: Circle transfer % cannot be replaced by %',
            OLD.idempotency_key, OLD.circle_transfer_id, NEW.circle_transfer_id
            USING ERRCODE = 'OC001';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS onchain_withdrawal_transition ON onchain_withdrawals;
CREATE TRIGGER onchain_withdrawal_transition BEFORE UPDATE ON onchain_withdrawals
    FOR EACH ROW EXECUTE FUNCTION onchain_withdrawal_transition();

-- A withdrawal is the record of money held for a user: it is never deleted.
CREATE OR REPLACE FUNCTION onchain_withdrawal_keep() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'withdrawal %: withdrawals are never deleted', OLD.idempotency_key
        USING ERRCODE = 'OC001';
END $$;

DROP TRIGGER IF EXISTS onchain_withdrawal_keep ON onchain_withdrawals;
CREATE TRIGGER onchain_withdrawal_keep BEFORE DELETE ON onchain_withdrawals
    FOR EACH ROW EXECUTE FUNCTION onchain_withdrawal_keep();
