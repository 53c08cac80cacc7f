-- The audit trail is append-only.
CREATE OR REPLACE FUNCTION cutover_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cutover: % rows are append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'CU001';
END $$;

DROP TRIGGER IF EXISTS cutover_phase_audit_append_only ON cutover_phase_audit;
CREATE TRIGGER cutover_phase_audit_append_only BEFORE UPDATE OR DELETE ON cutover_phase_audit
    FOR EACH ROW EXECUTE FUNCTION cutover_refuse_change();

-- The balance path's journal is append-only too: a deleted row would let its reference apply
-- again, a rewritten one would make a replay answer something else.
DROP TRIGGER IF EXISTS cutover_balance_mutations_append_only ON cutover_balance_mutations;
CREATE TRIGGER cutover_balance_mutations_append_only
    BEFORE UPDATE OR DELETE ON cutover_balance_mutations
    FOR EACH ROW EXECUTE FUNCTION cutover_refuse_change();

-- The balance path in one round trip: every user-balance mutation, routed by phase (the phase
-- table in README.md). Error codes, mapped in cutover/exceptions.py:
--   CU002 kill switch engaged, CU003 reference reused for another mutation (COLUMN
--   'reference'), a currency other than the user's (COLUMN 'currency'), or an unknown
--   counterparty, CU004 insufficient funds in the legacy store,
--   CU005 the ledger refused a write the phase requires (strict, cutover, or the legacy mirror;
--   the whole mutation rolls back; DETAIL is the phase, HINT the user, for a caller that found
--   the user itself, as onchain_deposit_credit does), CU006 a concurrent duplicate committed
--   first (nothing applied; retried, it becomes a replay); LD002 from the ledger in cutover =
--   insufficient funds.
-- One currency per user, in every phase: a user's legacy row and ledger balance account (at
-- most one, index cutover_one_balance_account_per_user) hold the same currency, and a mutation
-- in any other is refused, so the rollback's rebuild of `balances` always has one row to write.
-- The legacy mirror: in phase legacy, once custody is open for the currency (a row in
-- cutover_custody_openings), the counterparty's side is posted against opening-balance equity
-- (reference = the journal's, so once with it), the user's shard of it (ledger migration 0011);
-- the next backfill moves the user's side from equity to the user, so system accounts end as if
-- the mutation had happened in shadow.
-- Locks, in order: the phase lock (shared; phase flips take it exclusively), the journal's
-- reference, the user's legacy row, then the ledger accounts (in account order).
-- The shadow experiment's figures, per mutation, on its journal row (Scientist's control and
-- candidate): legacy_us, the legacy write's time (its row lock's wait included), and ledger_us,
-- the ledger write's (counterparty, user account, posting, balance read), in microseconds of
-- clock_timestamp(), each NULL when the phase does not write that store; mismatch, the two
-- stores' balances differed after a dual write (a failed ledger write in shadow or read_switch
-- included): the `discrepancy` returned, whose discrepancy row it opened or saw again.
-- p_isolate_ledger (default true): the ledger's write runs in a subtransaction, so that its
-- failure is recorded (shadow, read_switch) or raised as CU005 (strict, the mirror) or LD002
-- (cutover), as above. false: no subtransaction (about a fifth of a shadow mutation's time in
-- PostgreSQL), and a failure of the ledger's write fails the call with the ledger's own error,
-- nothing written; the caller then repeats the call with true, which gives the answer above.
-- Only a caller that can repeat the call (autocommit: the statement is its transaction;
-- cutover.balance_path, onchain.deposits) passes false.
-- Its statements read by index (`enable_seqscan = off`): PL/pgSQL keeps their plans per
-- connection until the table is analyzed again, and the journal's reference look-up planned
-- while the journal was empty became a sequential scan over the whole growing journal.
DROP FUNCTION IF EXISTS cutover_balance_mutate(uuid, text, numeric, text, text, text, text, text);
CREATE OR REPLACE FUNCTION cutover_balance_mutate(
    p_user_id uuid, p_direction text, p_amount numeric, p_currency text, p_reference text,
    p_reason text, p_counterparty text, p_correlation_id text,
    p_isolate_ledger boolean DEFAULT true,
    OUT created boolean, OUT phase text, OUT legacy_balance numeric, OUT ledger_balance numeric,
    OUT ledger_status text, OUT ledger_transaction_id bigint, OUT ledger_error text,
    OUT discrepancy boolean
) LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_state record;
    v_delta numeric := CASE WHEN p_direction = 'credit' THEN p_amount ELSE -p_amount END;
    v_held text;
    v_account bigint;
    v_other bigint;
    v_equity bigint;
    v_mirror boolean;
    v_shard int;
    v_legs jsonb;
    v_meta jsonb;
    v_clock timestamptz;
    v_lap timestamptz;
    v_legacy_us bigint;
    v_ledger_us bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7401001);  -- cutover.locks.PHASE_LOCK
    -- The phase (read under the lock) and this reference's journal row, if any.
    SELECT s.phase, s.kill_switch, s.kill_switch_reason, m.id AS first_id,
           m.user_id AS first_user_id, m.direction AS first_direction,
           m.amount AS first_amount, m.currency AS first_currency, m.phase AS first_phase,
           m.legacy_balance_after, m.ledger_status AS first_ledger_status,
           m.ledger_transaction_id AS first_ledger_transaction_id,
           m.ledger_error AS first_ledger_error
      INTO v_state
      FROM cutover_phase_state s
      LEFT JOIN cutover_balance_mutations m ON m.reference = p_reference
     WHERE s.id = 1;
    IF v_state.kill_switch THEN
        RAISE EXCEPTION 'kill switch engaged: %', v_state.kill_switch_reason USING ERRCODE = 'CU002';
    END IF;
    phase := v_state.phase;
    ledger_status := CASE WHEN phase = 'legacy' THEN 'not_written' ELSE 'posted' END;
    ledger_error := '';
    discrepancy := false;

    -- A replay answers as the first time, or is refused if it differs. (A concurrent duplicate
    -- that gets past this look-up fails on the journal's unique reference at the end, CU006,
    -- and the caller retries it into this branch.)
    IF v_state.first_id IS NOT NULL THEN
        IF (v_state.first_user_id, v_state.first_direction, v_state.first_amount,
            v_state.first_currency)
           IS DISTINCT FROM (p_user_id, p_direction, p_amount, p_currency) THEN
            RAISE EXCEPTION 'reference % was already used for % % % to user %', p_reference,
                v_state.first_direction, v_state.first_amount, v_state.first_currency,
                v_state.first_user_id USING ERRCODE = 'CU003', COLUMN = 'reference';
        END IF;
        created := false;
        phase := v_state.first_phase;
        legacy_balance := v_state.legacy_balance_after;
        ledger_status := v_state.first_ledger_status;
        ledger_transaction_id := v_state.first_ledger_transaction_id;
        ledger_error := v_state.first_ledger_error;
        RETURN;
    END IF;
    created := true;

    -- One currency per user, in the store this phase does not write (each write below refuses
    -- another currency in its own store).
    IF phase = 'legacy' THEN
        SELECT u.currency INTO v_held FROM ledger_user_balances u
         WHERE u.user_id = p_user_id AND u.currency <> p_currency;
    ELSIF phase = 'cutover' THEN
        SELECT b.currency INTO v_held FROM balances b
         WHERE b.user_id = p_user_id AND b.currency <> p_currency;
    END IF;
    IF v_held IS NOT NULL THEN
        RAISE EXCEPTION 'user % holds %, not %: a user has one currency', p_user_id, v_held,
            p_currency USING ERRCODE = 'CU003', COLUMN = 'currency';
    END IF;

    v_clock := clock_timestamp();
    IF phase <> 'cutover' THEN  -- the legacy write, as the old code did it
        -- One statement that locks, checks and writes the row (a credit opens it); when it
        -- writes nothing, the row (locked) says why.
        IF v_delta > 0 THEN
            INSERT INTO balances AS b (user_id, buying_power, currency, updated_at)
            VALUES (p_user_id, p_amount, p_currency, now())
            ON CONFLICT (user_id) DO UPDATE
               SET buying_power = b.buying_power + EXCLUDED.buying_power, updated_at = now()
             WHERE b.currency = EXCLUDED.currency
            RETURNING b.buying_power INTO legacy_balance;
        ELSE
            UPDATE balances b SET buying_power = b.buying_power - p_amount, updated_at = now()
             WHERE b.user_id = p_user_id AND b.currency = p_currency
               AND b.buying_power >= p_amount
            RETURNING b.buying_power INTO legacy_balance;
        END IF;
        IF NOT FOUND THEN
            SELECT b.buying_power, b.currency INTO legacy_balance, v_held
              FROM balances b WHERE b.user_id = p_user_id FOR UPDATE;
            IF NOT FOUND THEN  -- no legacy row: the currency of a ledger account, if any
                SELECT u.currency INTO v_held FROM ledger_user_balances u
                 WHERE u.user_id = p_user_id;
            END IF;
            IF v_held <> p_currency THEN  -- the user holds another currency
                RAISE EXCEPTION 'user % holds %, not %: a user has one currency', p_user_id,
                    v_held, p_currency USING ERRCODE = 'CU003', COLUMN = 'currency';
            END IF;
            IF legacy_balance IS NULL OR legacy_balance + v_delta < 0 THEN
                RAISE EXCEPTION 'user %: balance % % is less than %', p_user_id,
                    coalesce(legacy_balance, 0), p_currency, p_amount USING ERRCODE = 'CU004';
            END IF;
            -- (a credit committed between the debit's update and this lock made it possible)
            UPDATE balances b SET buying_power = b.buying_power + v_delta, updated_at = now()
             WHERE b.user_id = p_user_id
            RETURNING b.buying_power INTO legacy_balance;
        END IF;
        v_lap := clock_timestamp();
        v_legacy_us := (extract(epoch FROM v_lap - v_clock) * 1000000)::bigint;
        v_clock := v_lap;  -- the ledger write's time starts where the legacy write's ended
    END IF;

    v_mirror := false;
    IF phase = 'legacy' THEN
        v_mirror := EXISTS (SELECT 1 FROM cutover_custody_openings c WHERE c.currency = p_currency);
    END IF;
    IF phase <> 'legacy' OR v_mirror THEN
        -- The counterparty's shard for this user (ledger migrations 0004 and 0008: 64 shards
        -- of each clearing account, `code` and `code#1`..`code#63`); unsharded accounts as
        -- they are. On bigint: abs() of the integer hash overflows for INT_MIN.
        v_shard := abs(hashtext(p_user_id::text)::bigint) % 64;
        SELECT s.account_id INTO v_other FROM ledger_system_balances s
         WHERE s.code = CASE WHEN v_shard = 0 THEN p_counterparty
                             ELSE p_counterparty || '#' || v_shard END;
        IF NOT FOUND THEN
            SELECT s.account_id INTO v_other FROM ledger_system_balances s
             WHERE s.code = p_counterparty;
        END IF;
        IF v_other IS NULL THEN
            RAISE EXCEPTION 'unknown counterparty account %', p_counterparty
                USING ERRCODE = 'CU003';
        END IF;
        v_meta := jsonb_build_object('reason', p_reason, 'user_id', p_user_id);
        IF coalesce(p_correlation_id, '') <> '' THEN
            v_meta := v_meta || jsonb_build_object('correlation_id', p_correlation_id);
        END IF;
    END IF;

    IF v_mirror THEN  -- the legacy mirror: the user's side goes to equity (the user's shard)
        SELECT s.account_id INTO v_equity FROM ledger_system_balances s
         WHERE s.code = CASE WHEN v_shard = 0 THEN 'opening_balance_equity_' || lower(p_currency)
                             ELSE 'opening_balance_equity_' || lower(p_currency) || '#' || v_shard
                        END;
        IF NOT FOUND THEN
            SELECT s.account_id INTO v_equity FROM ledger_system_balances s
             WHERE s.code = 'opening_balance_equity_' || lower(p_currency);
        END IF;
        IF v_equity <> v_other THEN  -- (a reversal against equity itself moves nothing)
            v_legs := jsonb_build_array(
                jsonb_build_object('account_id', CASE WHEN v_delta > 0 THEN v_other ELSE v_equity END,
                                   'side', 'debit', 'amount', p_amount, 'currency', p_currency),
                jsonb_build_object('account_id', CASE WHEN v_delta > 0 THEN v_equity ELSE v_other END,
                                   'side', 'credit', 'amount', p_amount, 'currency', p_currency));
            v_meta := v_meta || jsonb_build_object('mirror', true);
            IF NOT p_isolate_ledger THEN
                SELECT t.transaction_id INTO ledger_transaction_id
                  FROM ledger_post_transaction('balance', p_reference, 'legacy_' || p_direction,
                                               v_meta, v_legs) t;
            ELSE
                BEGIN
                    SELECT t.transaction_id INTO ledger_transaction_id
                      FROM ledger_post_transaction('balance', p_reference,
                                                   'legacy_' || p_direction, v_meta, v_legs) t;
                EXCEPTION WHEN OTHERS THEN
                    RAISE EXCEPTION 'ledger refused the legacy mirror of this mutation: %',
                        regexp_replace(SQLERRM, '^ledger: ', '')
                        USING ERRCODE = 'CU005', DETAIL = phase,
                        HINT = p_user_id::text;
                END;
            END IF;
        END IF;
    END IF;

    IF phase <> 'legacy' THEN  -- the ledger write
        SELECT u.account_id, u.currency INTO v_account, v_held FROM ledger_user_balances u
         WHERE u.user_id = p_user_id;
        IF NOT FOUND THEN
            PERFORM ledger_user_account_open(p_user_id, p_currency);
            SELECT u.account_id, u.currency INTO v_account, v_held FROM ledger_user_balances u
             WHERE u.user_id = p_user_id;
        END IF;
        IF v_held <> p_currency THEN  -- the user's account holds another currency
            RAISE EXCEPTION 'user % holds %, not %: a user has one currency', p_user_id, v_held,
                p_currency USING ERRCODE = 'CU003', COLUMN = 'currency';
        END IF;
        v_legs := jsonb_build_array(
            jsonb_build_object('account_id', CASE WHEN v_delta > 0 THEN v_other ELSE v_account END,
                               'side', 'debit', 'amount', p_amount, 'currency', p_currency),
            jsonb_build_object('account_id', CASE WHEN v_delta > 0 THEN v_account ELSE v_other END,
                               'side', 'credit', 'amount', p_amount, 'currency', p_currency));
        IF NOT p_isolate_ledger THEN
            SELECT t.transaction_id INTO ledger_transaction_id
              FROM ledger_post_transaction('balance', p_reference, 'balance_' || p_direction,
                                           v_meta, v_legs) t;
        ELSE
            BEGIN  -- a subtransaction: the savepoint of the dual write
                SELECT t.transaction_id INTO ledger_transaction_id
                  FROM ledger_post_transaction('balance', p_reference, 'balance_' || p_direction,
                                               v_meta, v_legs) t;
            EXCEPTION WHEN OTHERS THEN
                IF phase IN ('shadow', 'read_switch') THEN
                    ledger_status := 'failed';
                    ledger_error := regexp_replace(SQLERRM, '^ledger: ', '');
                ELSIF phase = 'cutover' AND SQLSTATE = 'LD002' THEN
                    RAISE;  -- the ledger is the only store: an ordinary refusal
                ELSIF SQLSTATE = 'LD002' THEN
                    RAISE EXCEPTION 'ledger refused the debit that the legacy store allowed (user %)',
                        p_user_id USING ERRCODE = 'CU005', DETAIL = phase,
                        HINT = p_user_id::text;
                ELSE
                    RAISE EXCEPTION 'ledger write failed: %', SQLERRM
                        USING ERRCODE = 'CU005', DETAIL = phase,
                        HINT = p_user_id::text;
                END IF;
            END;
        END IF;
        SELECT u.balance INTO ledger_balance FROM ledger_user_balances u
         WHERE u.account_id = v_account;
        v_ledger_us := (extract(epoch FROM clock_timestamp() - v_clock) * 1000000)::bigint;
    END IF;
    discrepancy := phase IN ('shadow', 'read_switch', 'strict')
                   AND ledger_balance IS DISTINCT FROM legacy_balance;

    -- The journal row, written once with the outcome: the reference is applied exactly once.
    INSERT INTO cutover_balance_mutations
        (reference, user_id, direction, amount, currency, reason, phase, legacy_balance_after,
         ledger_status, ledger_transaction_id, ledger_error, correlation_id, legacy_us, ledger_us,
         mismatch)
    VALUES (p_reference, p_user_id, p_direction, p_amount, p_currency, p_reason, phase,
            legacy_balance, ledger_status, ledger_transaction_id, ledger_error,
            coalesce(p_correlation_id, ''), v_legacy_us, v_ledger_us, discrepancy)
    ON CONFLICT (reference) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'reference % is being applied concurrently', p_reference
            USING ERRCODE = 'CU006';
    END IF;

    IF discrepancy THEN
        INSERT INTO cutover_discrepancies
            (user_id, currency, legacy_balance, ledger_balance, difference, status, source, phase,
             reference, detail, occurrences)
        VALUES (p_user_id, p_currency, legacy_balance, ledger_balance,
                legacy_balance - coalesce(ledger_balance, 0), 'open',
                CASE WHEN ledger_status = 'failed' THEN 'ledger_write_failed' ELSE 'dual_write' END,
                phase, p_reference, ledger_error, 1)
        -- (the one unresolved row, whatever its triage: cutover_discrepancies_uniq_unresolved)
        ON CONFLICT (user_id, currency) WHERE status IN ('open', 'investigating', 'known_difference')
        DO UPDATE
           SET legacy_balance = EXCLUDED.legacy_balance, ledger_balance = EXCLUDED.ledger_balance,
               difference = EXCLUDED.difference, source = EXCLUDED.source, phase = EXCLUDED.phase,
               reference = EXCLUDED.reference, detail = EXCLUDED.detail,
               occurrences = cutover_discrepancies.occurrences + 1, last_seen_at = now();
    END IF;
END $$;

-- The legacy schema's `users`, which `balances` belongs to, as the deployment checklist's manual
-- reconciliation reads it (deploy/checklist/): every user either store holds. We keep no user
-- registry (a user is an id the API is given), and a user first credited in cutover has a
-- ledger account only, which that query must still compare against a missing legacy row.
CREATE OR REPLACE VIEW users AS
SELECT b.user_id AS id FROM balances b
 UNION
SELECT u.user_id FROM ledger_user_balances u;

-- The deployment checklist's Phase 5, "Archive legacy tables after 90 days" (cutover.
-- legacy_archive): `balances` is copied into this schema, then emptied, and both are closed to
-- writes by cutover_legacy_archived_refuse (statement triggers the archive creates). The
-- archive is recorded in cutover_legacy_archives; from then on there is no legacy store to go
-- back to, so the phase never leaves cutover again. Errors: CU007 an archive recorded outside
-- its rule (the phase is not cutover, or has not been for long enough), CU008 a write to an
-- archived table or a phase change away from cutover after the archive.
CREATE SCHEMA IF NOT EXISTS legacy_archive;

CREATE OR REPLACE FUNCTION cutover_legacy_archived_refuse() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cutover: the legacy store is archived: %.% is not written any more (% refused)',
        TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP USING ERRCODE = 'CU008';
END $$;

CREATE OR REPLACE FUNCTION cutover_legacy_archive_check() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_state record;
BEGIN
    SELECT s.phase, s.entered_at INTO v_state FROM cutover_phase_state s WHERE s.id = 1;
    IF v_state.phase IS DISTINCT FROM 'cutover' THEN
        RAISE EXCEPTION 'cutover: % can be archived in cutover only; the phase is %',
            NEW.table_name, v_state.phase USING ERRCODE = 'CU007';
    END IF;
    IF NEW.cutover_entered_at IS DISTINCT FROM v_state.entered_at
       OR now() - v_state.entered_at < NEW.min_time_in_cutover THEN
        RAISE EXCEPTION 'cutover: % can be archived after % in cutover; in cutover since %',
            NEW.table_name, NEW.min_time_in_cutover, v_state.entered_at USING ERRCODE = 'CU007';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS cutover_legacy_archive_check ON cutover_legacy_archives;
CREATE TRIGGER cutover_legacy_archive_check BEFORE INSERT ON cutover_legacy_archives
    FOR EACH ROW EXECUTE FUNCTION cutover_legacy_archive_check();

DROP TRIGGER IF EXISTS cutover_legacy_archives_append_only ON cutover_legacy_archives;
CREATE TRIGGER cutover_legacy_archives_append_only
    BEFORE UPDATE OR DELETE ON cutover_legacy_archives
    FOR EACH ROW EXECUTE FUNCTION cutover_refuse_change();

CREATE OR REPLACE FUNCTION cutover_phase_archived_stays() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM cutover_legacy_archives) THEN
        RAISE EXCEPTION 'cutover: the legacy store is archived, so there is no legacy store to go back to (% -> % refused)',
            OLD.phase, NEW.phase USING ERRCODE = 'CU008';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS cutover_phase_archived_stays ON cutover_phase_state;
CREATE TRIGGER cutover_phase_archived_stays BEFORE UPDATE ON cutover_phase_state
    FOR EACH ROW WHEN (OLD.phase = 'cutover' AND NEW.phase IS DISTINCT FROM OLD.phase)
    EXECUTE FUNCTION cutover_phase_archived_stays();

-- Working a discrepancy (cutover.discrepancies). Unresolved: open, investigating,
-- known_difference (one such row per user and currency); ended: repaired (an approved repair
-- was applied) or resolved (the stores agree again), and an ended row never changes. The moves:
--   open             -> investigating | known_difference | repaired | resolved
--   investigating    -> known_difference | repaired | resolved
--   known_difference -> open (its rule expired or no longer matches) | investigating
--                       | repaired | resolved
-- A known difference names its rule (CHECK cutover_discrepancies_chk_known_rule). CU009.
CREATE OR REPLACE FUNCTION cutover_discrepancy_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status IN ('repaired', 'resolved') THEN
        RAISE EXCEPTION 'cutover: discrepancy % is % and never changes again', OLD.id, OLD.status
            USING ERRCODE = 'CU009';
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status AND NOT (
           (OLD.status = 'open'
            AND NEW.status IN ('investigating', 'known_difference', 'repaired', 'resolved'))
        OR (OLD.status = 'investigating'
            AND NEW.status IN ('known_difference', 'repaired', 'resolved'))
        OR (OLD.status = 'known_difference'
            AND NEW.status IN ('open', 'investigating', 'repaired', 'resolved'))) THEN
        RAISE EXCEPTION 'cutover: discrepancy % cannot go from % to %', OLD.id, OLD.status,
            NEW.status USING ERRCODE = 'CU009';
    END IF;
    IF NEW.status = 'repaired' AND NOT EXISTS (
        SELECT 1 FROM cutover_discrepancy_repairs r
         WHERE r.discrepancy_id = NEW.id AND r.status = 'applied') THEN
        RAISE EXCEPTION 'cutover: discrepancy % is repaired only by an applied, approved repair',
            OLD.id USING ERRCODE = 'CU009';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS cutover_discrepancy_transition ON cutover_discrepancies;
CREATE TRIGGER cutover_discrepancy_transition BEFORE UPDATE ON cutover_discrepancies
    FOR EACH ROW EXECUTE FUNCTION cutover_discrepancy_transition();

-- A repair is decided once: requested -> applied (approved by another operator than the one
-- who requested it: CHECK cutover_repairs_chk_second_person) | lapsed. What was requested
-- never changes, a decided repair never changes, and no repair is deleted. CU009 (CU001 for a
-- DELETE).
CREATE OR REPLACE FUNCTION cutover_discrepancy_repair_decided() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'cutover: % rows are never deleted', TG_TABLE_NAME
            USING ERRCODE = 'CU001';
    END IF;
    IF OLD.status <> 'requested' OR NEW.status NOT IN ('applied', 'lapsed')
       OR (NEW.discrepancy_id, NEW.side, NEW.difference, NEW.legacy_balance, NEW.ledger_balance,
           NEW.reason, NEW.requested_by, NEW.requested_at)
          IS DISTINCT FROM
          (OLD.discrepancy_id, OLD.side, OLD.difference, OLD.legacy_balance, OLD.ledger_balance,
           OLD.reason, OLD.requested_by, OLD.requested_at) THEN
        RAISE EXCEPTION 'cutover: repair % is decided once, from requested to applied or lapsed (% -> % refused)',
            OLD.id, OLD.status, NEW.status USING ERRCODE = 'CU009';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS cutover_discrepancy_repair_decided ON cutover_discrepancy_repairs;
CREATE TRIGGER cutover_discrepancy_repair_decided
    BEFORE UPDATE OR DELETE ON cutover_discrepancy_repairs
    FOR EACH ROW EXECUTE FUNCTION cutover_discrepancy_repair_decided();

-- A known-difference rule never changes and is never deleted; it may only end early
-- (expires_at moved earlier). CU009 (CU001 for a DELETE).
CREATE OR REPLACE FUNCTION cutover_known_difference_kept() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'cutover: % rows are never deleted', TG_TABLE_NAME
            USING ERRCODE = 'CU001';
    END IF;
    IF NEW.expires_at > OLD.expires_at
       OR (NEW.user_id, NEW.currency, NEW.difference, NEW.reason, NEW.created_by, NEW.created_at)
          IS DISTINCT FROM
          (OLD.user_id, OLD.currency, OLD.difference, OLD.reason, OLD.created_by, OLD.created_at) THEN
        RAISE EXCEPTION 'cutover: known difference % can only end earlier; it never changes otherwise',
            OLD.id USING ERRCODE = 'CU009';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS cutover_known_difference_kept ON cutover_known_differences;
CREATE TRIGGER cutover_known_difference_kept
    BEFORE UPDATE OR DELETE ON cutover_known_differences
    FOR EACH ROW EXECUTE FUNCTION cutover_known_difference_kept();

-- The backfill's chunk (cutover.backfill), in the caller's transaction, which holds the row
-- lock of user range `p_range_id` (cutover_backfill_ranges: one of its run's disjoint user_id
-- ranges, `low` <= user_id < `high`, NULL unbounded; taken FOR UPDATE SKIP LOCKED, so each
-- range is worked by one transaction at a time and the others by other workers at once): the
-- range continues from its checkpoint (`position`, the last user it covered) with the next
-- `p_limit` legacy users of the range, in user_id order, whose ledger balance is not their
-- legacy balance, and brings each to its legacy balance: one ledger transaction per currency
-- against the currency's opening-balance equity, the shard of the range (its seq modulo 64,
-- ledger migration 0011: parallel chunks lock different equity rows; namespace `backfill`), a
-- cutover_backfill_postings row per user (unique per state of the user's account: a difference
-- is never posted twice), and the range's checkpoint moved past the chunk. Candidates are found
-- without locks; then, in the balance path's order, their legacy rows are locked (user order),
-- their ledger accounts opened and locked (account order), and every difference is computed
-- again under those locks: a mutation that committed meanwhile is in it, one that waits comes
-- after it, so each user's ledger balance equals the legacy balance at the moment of the chunk.
-- A range with no candidate left is finished (its run is finished by cutover.backfill once all
-- its ranges are). CU003: a user whose ledger account holds another currency than their legacy
-- row.
CREATE OR REPLACE FUNCTION cutover_backfill_range_chunk(
    p_range_id bigint, p_limit int,
    OUT examined int, OUT posted int, OUT moved numeric, OUT transactions int,
    OUT finished boolean
) LANGUAGE plpgsql AS $$
DECLARE
    v_range record;
    v_from uuid;
    v_users uuid[];
    v_mismatch record;
    v_chunk record;
    v_legs jsonb;
    v_transaction bigint;
    v_shard int;
BEGIN
    examined := 0;
    posted := 0;
    moved := 0;
    transactions := 0;
    SELECT r.run_id, r.seq, r.low, r.high, r.position, r.finished_at IS NOT NULL AS finished
      INTO v_range
      FROM cutover_backfill_ranges r WHERE r.id = p_range_id FOR UPDATE;
    finished := v_range.finished;
    IF finished THEN
        RETURN;
    END IF;
    v_from := coalesce(v_range.position, v_range.low, '00000000-0000-0000-0000-000000000000');

    SELECT array_agg(c.user_id ORDER BY c.user_id) INTO v_users
      FROM (SELECT b.user_id FROM balances b
              LEFT JOIN ledger_user_balances a  -- (bounded too: a merge join starts there)
                ON a.user_id = b.user_id AND a.currency = b.currency
               AND a.user_id >= v_from
               AND (v_range.high IS NULL OR a.user_id < v_range.high)
             WHERE b.user_id >= v_from
               AND (v_range.high IS NULL OR b.user_id < v_range.high)
               AND b.user_id IS DISTINCT FROM v_range.position
               AND b.buying_power <> coalesce(a.balance, 0)
             ORDER BY b.user_id LIMIT p_limit) c;
    examined := coalesce(cardinality(v_users), 0);
    IF examined = 0 THEN
        finished := true;
        UPDATE cutover_backfill_ranges SET finished_at = now(), updated_at = now()
         WHERE id = p_range_id;
        RETURN;
    END IF;

    PERFORM 1 FROM balances b WHERE b.user_id = ANY(v_users) ORDER BY b.user_id FOR UPDATE;
    PERFORM ledger_user_accounts_open(array_agg(b.user_id), array_agg(b.currency))
       FROM balances b
      WHERE b.user_id = ANY(v_users)
        AND NOT EXISTS (SELECT 1 FROM ledger_user_balances a WHERE a.user_id = b.user_id);
    SELECT b.user_id, b.currency AS legacy, a.currency AS ledger INTO v_mismatch
      FROM balances b JOIN ledger_user_balances a ON a.user_id = b.user_id
     WHERE b.user_id = ANY(v_users) AND a.user_id = ANY(v_users) AND a.currency <> b.currency
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'user % holds % in the ledger, not % as in the legacy store: a user has one currency',
            v_mismatch.user_id, v_mismatch.ledger, v_mismatch.legacy USING ERRCODE = 'CU003';
    END IF;
    PERFORM 1 FROM ledger_user_balances a WHERE a.user_id = ANY(v_users)
      ORDER BY a.account_id FOR UPDATE;

    v_shard := v_range.seq % 64;
    FOR v_chunk IN
        SELECT b.currency, count(*) AS users, sum(b.buying_power - a.balance) AS net,
               sum(abs(b.buying_power - a.balance)) AS moved,
               jsonb_agg(jsonb_build_object(
                   'account_id', a.account_id,
                   'side', CASE WHEN b.buying_power > a.balance THEN 'credit' ELSE 'debit' END,
                   'amount', abs(b.buying_power - a.balance),
                   'currency', b.currency)) AS legs
          FROM balances b
          JOIN ledger_user_balances a ON a.user_id = b.user_id AND a.currency = b.currency
         WHERE b.user_id = ANY(v_users) AND a.user_id = ANY(v_users)
           AND b.buying_power <> a.balance
         GROUP BY b.currency ORDER BY b.currency
    LOOP
        v_legs := v_chunk.legs;
        IF v_chunk.net <> 0 THEN  -- the chunk's total, from (or back to) the range's equity shard
            v_legs := v_legs || jsonb_build_array(jsonb_build_object(
                'account_id', coalesce(
                    (SELECT s.account_id FROM ledger_system_balances s
                      WHERE v_shard > 0 AND s.code = 'opening_balance_equity_'
                            || lower(v_chunk.currency) || '#' || v_shard),
                    (SELECT s.account_id FROM ledger_system_balances s
                      WHERE s.code = 'opening_balance_equity_' || lower(v_chunk.currency))),
                'side', CASE WHEN v_chunk.net > 0 THEN 'debit' ELSE 'credit' END,
                'amount', abs(v_chunk.net),
                'currency', v_chunk.currency));
        END IF;
        SELECT t.transaction_id INTO v_transaction
          FROM ledger_post_transaction(
              'backfill',
              'run-' || v_range.run_id || ':' || v_chunk.currency || ':' || v_users[examined],
              'opening_balance',
              jsonb_build_object('backfill_run', v_range.run_id, 'range', v_range.seq,
                                 'users', v_chunk.users),
              v_legs) t;
        INSERT INTO cutover_backfill_postings
            (run_id, user_id, currency, entries_before, legacy_balance, amount,
             ledger_transaction_id)
        SELECT v_range.run_id, a.user_id, a.currency, a.entry_count - 1, a.balance,
               CASE WHEN l.side = 'credit' THEN l.amount ELSE -l.amount END, v_transaction
          FROM jsonb_to_recordset(v_chunk.legs) AS l(account_id bigint, side text, amount numeric)
          JOIN ledger_user_balances a ON a.account_id = l.account_id;
        posted := posted + v_chunk.users;
        moved := moved + v_chunk.moved;
        transactions := transactions + 1;
    END LOOP;

    UPDATE cutover_backfill_ranges
       SET position = v_users[examined], chunks = chunks + 1,
           users_examined = users_examined + examined, postings = postings + posted,
           amount = amount + moved, updated_at = now()
     WHERE id = p_range_id;
END $$;
