-- Withdrawals move only along legal transitions; a finished withdrawal never changes again.
-- OC001: an illegal transition (mapped in onchain/exceptions.py, as is OC002 below).
--   pending   -> submitted | completed | failed | dead   (and pending -> pending: a retry noted)
--   submitted -> completed | failed                      (and submitted -> submitted)
--   dead      -> pending (an operator resends) | failed (an operator reverses the hold)
--                | submitted (an operator's cancel found the transfer Circle made for it)
CREATE OR REPLACE FUNCTION onchain_withdrawal_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (
        (OLD.status = 'pending' AND NEW.status IN ('pending', 'submitted', 'completed', 'failed', 'dead'))
        OR (OLD.status = 'submitted' AND NEW.status IN ('submitted', 'completed', 'failed'))
        OR (OLD.status = 'dead' AND NEW.status IN ('pending', 'submitted', 'failed'))
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

-- A deposit address credits its user in the address's currency, and a user holds one currency
-- (cutover_balance_mutate's rule, so that a rollback can rebuild the legacy store): an address
-- for a user who holds another currency would take deposits that can never be credited.
CREATE OR REPLACE FUNCTION onchain_deposit_address_currency() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_held text;
BEGIN
    SELECT b.currency INTO v_held FROM balances b WHERE b.user_id = NEW.user_id;
    IF NOT FOUND THEN
        SELECT u.currency INTO v_held FROM ledger_user_balances u WHERE u.user_id = NEW.user_id;
    END IF;
    IF v_held IS NOT NULL AND v_held <> NEW.currency THEN
        RAISE EXCEPTION 'deposit address %: user % holds %, not %', NEW.address, NEW.user_id,
            v_held, NEW.currency USING ERRCODE = 'OC002';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS onchain_deposit_address_currency ON onchain_deposit_addresses;
CREATE TRIGGER onchain_deposit_address_currency BEFORE INSERT OR UPDATE ON onchain_deposit_addresses
    FOR EACH ROW EXECUTE FUNCTION onchain_deposit_address_currency();

-- A completed inbound Circle transfer credited to its deposit address's user (onchain.inbox):
-- the decisions of the deposit path in one round trip, so a webhook costs about what storing it
-- costs. Python parses and checks the notification first (its currency mapped, its amount parsed
-- strictly, the address in its stored form); these functions decide and write.

-- onchain_deposit_credit: in the caller's transaction, once per transfer id whichever way it
-- arrives (webhook, redelivery, poll): one decision at a time per transfer (an advisory lock,
-- cutover.locks.CIRCLE_TRANSFER_LOCK), so concurrent deliveries wait for each other. outcome:
--   credited             credited now, through cutover_balance_mutate (the balance path)
--   credited_before      credited already, as this says
--   unknown_address      no one user holds the address: nothing done (parked by the caller)
--   held_other_currency  the user holds another currency than the address's (parked)
--   currency_mismatch    the transfer brings another currency than the address's: refused
--   contradicted         credited already otherwise (another amount or user): a transfer
--                        discrepancy recorded for an operator, nothing credited
-- A strict failure of the credit (CU005) names the user in its HINT (cutover_balance_mutate's),
-- for the StrictFailure row the caller writes after the rollback.
-- p_isolate_ledger: cutover_balance_mutate's (false only for a caller that repeats the call
-- with true when it fails).
DROP FUNCTION IF EXISTS onchain_deposit_credit(
    text, text, text, text[], text, numeric, text, text, text, text);
CREATE OR REPLACE FUNCTION onchain_deposit_credit(
    p_transfer_id text, p_chain text, p_address text, p_evm_chains text[], p_currency text,
    p_amount numeric, p_notified_amount text, p_said text, p_source text, p_counterparty text,
    p_isolate_ledger boolean DEFAULT true,
    OUT outcome text, OUT why text, OUT deposit_user uuid, OUT phase text,
    OUT mutation_created boolean, OUT ledger_status text, OUT discrepancy boolean
) LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_reference text := 'circle:transfer:' || p_transfer_id;
    v_currency text;
    v_users bigint;
    v_held text;
    v_done record;
    v_mutation record;
BEGIN
    why := '';
    mutation_created := false;
    ledger_status := '';
    discrepancy := false;
    -- The address as onchain.selectors.deposit_address_find compares it: exactly on its chain,
    -- or, when the notification names no chain, on any chain while one user holds it.
    IF p_chain IS NOT NULL THEN
        SELECT a.user_id, a.currency INTO deposit_user, v_currency
          FROM onchain_deposit_addresses a
         WHERE a.chain = p_chain AND a.address = p_address;
    ELSE
        SELECT count(DISTINCT a.user_id), (array_agg(a.user_id ORDER BY a.id))[1],
               (array_agg(a.currency ORDER BY a.id))[1]
          INTO v_users, deposit_user, v_currency
          FROM onchain_deposit_addresses a
         WHERE a.address = p_address
            OR (a.chain = ANY (p_evm_chains) AND a.address = lower(p_address));
        IF v_users <> 1 THEN
            deposit_user := NULL;
        END IF;
    END IF;
    IF deposit_user IS NULL THEN
        outcome := 'unknown_address';
        RETURN;
    END IF;
    IF v_currency <> p_currency THEN
        outcome := 'currency_mismatch';
        why := format('transfer %s brings %s to an address for %s', p_transfer_id, p_currency,
                      v_currency);
        RETURN;
    END IF;
    -- The user's one currency (cutover.selectors.user_currency): the legacy row first.
    SELECT b.currency INTO v_held FROM balances b WHERE b.user_id = deposit_user;
    IF NOT FOUND THEN
        SELECT u.currency INTO v_held FROM ledger_user_balances u WHERE u.user_id = deposit_user;
    END IF;
    IF v_held IS NOT NULL AND v_held <> v_currency THEN
        outcome := 'held_other_currency';
        why := format('user %s holds %s, not %s', deposit_user, v_held, v_currency);
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(7401005, hashtext(p_transfer_id));  -- cutover.locks.CIRCLE_TRANSFER_LOCK
    SELECT m.amount, m.currency, m.user_id INTO v_done
      FROM cutover_balance_mutations m WHERE m.reference = v_reference;
    IF FOUND THEN
        IF v_done.amount = p_amount AND v_done.user_id = deposit_user THEN
            outcome := 'credited_before';
            RETURN;
        END IF;
        why := format('transfer %s was credited %s %s to user %s; %s says %s', p_transfer_id,
                      v_done.amount, v_done.currency, v_done.user_id, p_source, p_said);
        INSERT INTO onchain_transfer_discrepancies
            (transfer_id, notification_id, reference, credited_amount, notified_amount, detail,
             status, created_at, resolved_by, resolution_note)
        VALUES (p_transfer_id, p_source, v_reference, v_done.amount, p_notified_amount, why,
                'open', now(), '', '')
        ON CONFLICT (notification_id) DO NOTHING;
        outcome := 'contradicted';
        RETURN;
    END IF;
    SELECT m.phase, m.created, m.ledger_status, m.discrepancy INTO v_mutation
      FROM cutover_balance_mutate(deposit_user, 'credit', p_amount, v_currency, v_reference,
                                  'circle_deposit', p_counterparty, p_source,
                                  p_isolate_ledger) m;
    outcome := 'credited';
    phase := v_mutation.phase;
    mutation_created := v_mutation.created;
    ledger_status := v_mutation.ledger_status;
    discrepancy := v_mutation.discrepancy;
END $$;

-- Both deposit functions read by index (`enable_seqscan = off`), as cutover_balance_mutate does:
-- their plans are kept per connection until a table is analyzed again, and the inbox's and the
-- journal's look-ups planned while those were empty became sequential scans over the whole
-- growing tables.
-- onchain_deposit_notification_accept: a verified notification of a completed inbound transfer
-- stored in the inbox and applied in one statement (autocommit: its own transaction): the
-- deposit credited (onchain_deposit_credit) and the row inserted with its outcome, or nothing
-- at all. A notification id stored before is not applied here (inserted false, its stored
-- status, its deliveries counted): the caller evaluates the stored row, as for any other
-- notification. (The row is written once, with its outcome: a row inserted 'received' and
-- updated in the same statement wrote every index twice for nothing anyone could see.)
DROP FUNCTION IF EXISTS onchain_deposit_notification_accept(
    text, text, text, text, text, text, text, text, text[], text, numeric, text, text, text);
CREATE OR REPLACE FUNCTION onchain_deposit_notification_accept(
    p_notification_id text, p_notification_type text, p_inbox_transfer_id text, p_key_id text,
    p_body text, p_transfer_id text, p_chain text, p_address text, p_evm_chains text[],
    p_currency text, p_amount numeric, p_notified_amount text, p_said text,
    p_counterparty text, p_isolate_ledger boolean DEFAULT true,
    OUT inserted boolean, OUT inbox_status text, OUT outcome text, OUT why text,
    OUT deposit_user uuid, OUT phase text, OUT mutation_created boolean, OUT ledger_status text,
    OUT discrepancy boolean
) LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_credit record;
BEGIN
    inserted := false;
    -- Deliveries of one id wait for each other: the second sees the first's row.
    PERFORM pg_advisory_xact_lock(7401007, hashtext(p_notification_id));  -- cutover.locks.CIRCLE_NOTIFICATION_LOCK
    UPDATE onchain_circle_notifications n SET deliveries = n.deliveries + 1
     WHERE n.notification_id = p_notification_id
    RETURNING n.status INTO inbox_status;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v_credit
      FROM onchain_deposit_credit(p_transfer_id, p_chain, p_address, p_evm_chains, p_currency,
                                  p_amount, p_notified_amount, p_said, p_notification_id,
                                  p_counterparty, p_isolate_ledger);
    inbox_status := CASE v_credit.outcome
        WHEN 'credited' THEN 'processed'
        WHEN 'credited_before' THEN 'processed'
        WHEN 'unknown_address' THEN 'parked'
        WHEN 'held_other_currency' THEN 'parked'
        ELSE 'refused'
    END;
    -- (A writer of the inbox that does not take the notification's lock, and stored this id
    -- meanwhile, keeps its row; this delivery is counted on it.)
    INSERT INTO onchain_circle_notifications AS n
        (notification_id, notification_type, transfer_id, key_id, body, status, error,
         deliveries, attempts, received_at, processed_at)
    VALUES (p_notification_id, p_notification_type, p_inbox_transfer_id, p_key_id, p_body,
            inbox_status, CASE WHEN inbox_status = 'refused' THEN v_credit.why ELSE '' END,
            1, 1, now(), now())
    ON CONFLICT (notification_id) DO UPDATE SET deliveries = n.deliveries + 1
    RETURNING n.status, (n.xmax = 0) INTO inbox_status, inserted;
    IF NOT inserted THEN
        RETURN;
    END IF;
    outcome := v_credit.outcome;
    why := v_credit.why;
    deposit_user := v_credit.deposit_user;
    phase := v_credit.phase;
    mutation_created := v_credit.mutation_created;
    ledger_status := v_credit.ledger_status;
    discrepancy := v_credit.discrepancy;
END $$;
