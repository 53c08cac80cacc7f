-- Conversion jobs move only along legal transitions (TR001, mapped in treasury/exceptions.py):
--   pending   -> pending (a retry noted) | submitted | failed
--              | cancelled (only if never sent: a sent job may exist at the provider)
--              | timed_out (only if sent: its answer was lost and the provider cannot say yet)
--   submitted -> submitted | completed | failed | timed_out | disputed
--   timed_out -> timed_out | completed | failed | disputed
--              (fate unknown: open, asked until the provider gives a final answer)
--   completed -> reversed (an operator reverses a conversion the provider refunded)
--   disputed  -> completed (an operator books what the provider converted, with its posting)
--              | failed (the provider failed or refunded it): an operator's resolution
-- completed, failed, cancelled, reversed (and disputed, but for its resolution) are final: a
-- final job records only the provider's later status of its transfer (provider_status) and
-- when it was last asked (provider_checked_at), so that a refund of a completed conversion, or
-- a failed one processed after all, is kept for an operator; what it booked never changes.
-- What a job converts never changes.
CREATE OR REPLACE FUNCTION treasury_job_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (
        (OLD.status = 'pending' AND NEW.status IN ('pending', 'submitted', 'failed'))
        OR (OLD.status = 'pending' AND NEW.status = 'cancelled' AND OLD.attempts = 0)
        OR (OLD.status = 'pending' AND NEW.status = 'timed_out' AND NEW.attempts > 0)
        OR (OLD.status = 'submitted'
            AND NEW.status IN ('submitted', 'completed', 'failed', 'timed_out', 'disputed'))
        OR (OLD.status = 'timed_out'
            AND NEW.status IN ('timed_out', 'completed', 'failed', 'disputed'))
        OR (OLD.status = 'disputed' AND NEW.status = 'failed')
        OR (OLD.status = 'disputed' AND NEW.status = 'completed'
            AND NEW.ledger_transaction_id IS NOT NULL AND NEW.target_amount IS NOT NULL)
        OR (OLD.status = 'completed' AND NEW.status = 'reversed'
            AND NEW.reversal_transaction_id IS NOT NULL
            AND (NEW.target_amount, NEW.ledger_transaction_id)
                = (OLD.target_amount, OLD.ledger_transaction_id))
        OR (OLD.status IN ('completed', 'failed', 'cancelled', 'disputed', 'reversed')
            AND NEW.status = OLD.status
            AND to_jsonb(NEW) - ARRAY['provider_status', 'provider_checked_at', 'updated_at']
                = to_jsonb(OLD) - ARRAY['provider_status', 'provider_checked_at', 'updated_at'])
    ) THEN
        RAISE EXCEPTION 'conversion job %: % -> % is not a legal transition', OLD.id,
            OLD.status, NEW.status USING ERRCODE = 'TR001';
    END IF;
    IF (NEW.idempotency_key, NEW.buffer_currency, NEW.source_currency, NEW.source_amount,
        NEW.target_currency, NEW.provider_id)
       IS DISTINCT FROM (OLD.idempotency_key, OLD.buffer_currency, OLD.source_currency,
                         OLD.source_amount, OLD.target_currency, OLD.provider_id) THEN
        RAISE EXCEPTION 'conversion job %: what it converts cannot change', OLD.id
            USING ERRCODE = 'TR001';
    END IF;
    IF OLD.provider_reference IS NOT NULL
       AND NEW.provider_reference IS DISTINCT FROM OLD.provider_reference THEN
        RAISE EXCEPTION 'conversion job %: provider reference % cannot be replaced', OLD.id,
            OLD.provider_reference USING ERRCODE = 'TR001';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS treasury_job_transition ON treasury_conversion_jobs;
CREATE TRIGGER treasury_job_transition BEFORE UPDATE ON treasury_conversion_jobs
    FOR EACH ROW EXECUTE FUNCTION treasury_job_transition();

-- The buffers against their thresholds, from the ledger's system buffer accounts. A buffer's
-- balance is the sum over its shards (ledger migration 0010: `usdc_buffer` and `usdc_buffer#1`
-- .. `usdc_buffer#63`, named one by one as ledger.selectors.system_balance does, SHARDS = 64;
-- `fiat_buffer` has none): deposits post to the depositor's shard.
CREATE OR REPLACE VIEW v_buffer_status AS
SELECT t.currency,
       a.code AS account,
       s.balance,
       t.minimum, t.target, t.maximum,
       CASE WHEN s.balance < t.minimum THEN 'below_min'
            WHEN s.balance > t.maximum THEN 'above_max'
            ELSE 'ok' END AS state
  FROM treasury_buffer_thresholds t
  JOIN ledger_system_balances a
    ON a.code = CASE WHEN t.currency = 'USDC' THEN 'usdc_buffer' ELSE 'fiat_buffer' END
   AND a.currency = t.currency
 CROSS JOIN LATERAL (
       SELECT sum(b.balance)::numeric(38, 6) AS balance
         FROM ledger_system_balances b
        WHERE b.code = ANY (ARRAY[a.code::text]
                            || ARRAY(SELECT a.code || '#' || n FROM generate_series(1, 63) n))
          AND b.currency = a.currency) s;

-- The deployment checklist's names for the treasury's tables (deploy/checklist/), so that its
-- SQL runs as written: one view per table, its columns as they are.
CREATE OR REPLACE VIEW conversion_providers AS
SELECT p.id, p.code, p.name, p.enabled, p.priority, p.healthy, p.consecutive_failures,
       p.last_error, p.last_failure_at
  FROM treasury_providers p;

CREATE OR REPLACE VIEW buffer_thresholds AS
SELECT t.id, t.currency, t.minimum, t.target, t.maximum, t.updated_at
  FROM treasury_buffer_thresholds t;

CREATE OR REPLACE VIEW conversion_jobs AS
SELECT j.id, j.idempotency_key, j.buffer_currency, j.source_currency, j.source_amount,
       j.target_currency, j.target_amount, j.provider_id, j.provider_reference, j.status,
       j.attempts, j.next_attempt_at, j.last_error, j.ledger_transaction_id, j.created_by,
       j.created_at, j.submitted_at, j.finished_at, j.updated_at
  FROM treasury_conversion_jobs j;
