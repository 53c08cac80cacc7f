-- The ledger's rules, held by PostgreSQL so that no writer (ORM, raw SQL, a future service)
-- can break them. Error codes LD001..LD009 are mapped to domain exceptions in ledger/exceptions.py.

-- Entry insert: lock the account row, check currency and scale, move the cached balance,
-- extend the account's hash chain. Runs in the inserting statement, so a raw INSERT keeps
-- balances and chains right too.
-- Its look-ups (and the commit check's, below) are planned once per connection and kept until
-- the table is analyzed again: planned while the ledger was nearly empty, a sequential scan
-- looked cheapest and then read the whole growing table for every entry. Always by index.
CREATE OR REPLACE FUNCTION ledger_entry_apply() RETURNS trigger
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    acc record;
    new_balance numeric;
BEGIN
    -- (One statement for the account and the transaction: it runs for every entry.)
    SELECT a.id, a.currency, a.normal_balance, a.allow_negative, a.balance, a.entry_count,
           a.last_hash, c.decimals,
           EXISTS (SELECT 1 FROM ledger_transactions t
                    WHERE t.id = NEW.transaction_id AND t.xact_id = pg_current_xact_id()) AS own
      INTO acc
      FROM ledger_accounts a JOIN ledger_currencies c ON c.code = a.currency
     WHERE a.id = NEW.account_id
       FOR UPDATE OF a;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ledger: account % does not exist', NEW.account_id
            USING ERRCODE = 'LD003';
    END IF;
    -- (The entries' CHECK constraints, prepared again at every insert statement, are held here,
    -- where every entry passes: a side other than debit or credit under the constraint's name
    -- and SQLSTATE, an amount that is not positive as LD005 below, which always came first.)
    IF NEW.side NOT IN ('debit', 'credit') THEN
        RAISE EXCEPTION 'new row for relation "ledger_entries" violates check constraint '
            '"ledger_entries_chk_side"' USING ERRCODE = 'check_violation',
            CONSTRAINT = 'ledger_entries_chk_side', TABLE = 'ledger_entries';
    END IF;
    IF NOT acc.own THEN
        RAISE EXCEPTION 'ledger: transaction % was not created by this database transaction; '
            'a transaction gets all its entries when it is posted', NEW.transaction_id
            USING ERRCODE = 'LD008';
    END IF;
    IF acc.currency <> NEW.currency THEN
        RAISE EXCEPTION 'ledger: account % holds %, not %', acc.id, acc.currency, NEW.currency
            USING ERRCODE = 'LD004';
    END IF;
    IF NEW.amount <= 0 OR NEW.amount <> round(NEW.amount, acc.decimals) THEN
        RAISE EXCEPTION 'ledger: amount % is not a positive % amount with at most % decimal places',
            NEW.amount, NEW.currency, acc.decimals USING ERRCODE = 'LD005';
    END IF;
    new_balance := acc.balance
        + CASE WHEN NEW.side = acc.normal_balance THEN NEW.amount ELSE -NEW.amount END;
    IF new_balance < 0 AND NOT acc.allow_negative THEN
        RAISE EXCEPTION 'ledger: account % would go negative (balance %, % %)',
            acc.id, acc.balance, NEW.side, NEW.amount USING ERRCODE = 'LD002';
    END IF;
    NEW.seq := acc.entry_count + 1;
    NEW.balance_after := new_balance;
    NEW.prev_hash := acc.last_hash;
    NEW.hash := ledger_entry_hash(acc.last_hash, NEW.id, NEW.transaction_id, NEW.account_id,
                                  NEW.currency, NEW.side, NEW.amount, NEW.seq);
    UPDATE ledger_accounts
       SET balance = new_balance, entry_count = NEW.seq, last_hash = NEW.hash
     WHERE id = acc.id;
    RETURN NEW;
END $$;

-- STABLE, as concat_ws is: the planner inlines it into the trigger's expression and into
-- `ledger verify`'s queries. (Declared IMMUTABLE it could not be inlined, so every call parsed
-- and planned its body again.)
CREATE OR REPLACE FUNCTION ledger_entry_hash(
    prev_hash text, entry_id bigint, transaction_id bigint, account_id bigint,
    currency text, side text, amount numeric, seq bigint
) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT encode(sha256(convert_to(concat_ws('|', prev_hash, entry_id, transaction_id,
        account_id, currency, side, amount::numeric(38, 6)::text, seq), 'UTF8')), 'hex')
$$;

DROP TRIGGER IF EXISTS ledger_entries_apply ON ledger_entries;
CREATE TRIGGER ledger_entries_apply BEFORE INSERT ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entry_apply();

-- Entries and transactions are written once.
CREATE OR REPLACE FUNCTION ledger_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger: % rows are immutable (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'LD007';
END $$;

DROP TRIGGER IF EXISTS ledger_entries_immutable ON ledger_entries;
CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
DROP TRIGGER IF EXISTS ledger_transactions_immutable ON ledger_transactions;
CREATE TRIGGER ledger_transactions_immutable BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

-- The database transaction that created a ledger transaction (top-level id, also when created
-- inside a savepoint): entries may be added to a ledger transaction only by that database
-- transaction, so a committed transaction can never gain legs.
ALTER TABLE ledger_transactions
    ADD COLUMN IF NOT EXISTS xact_id xid8 NOT NULL DEFAULT pg_current_xact_id();

-- At COMMIT, once per ledger transaction: two or more entries, balanced per currency. Its query
-- is planned once per connection (left to choose, PostgreSQL planned it again at every COMMIT:
-- a tenth of a deposit's time in PostgreSQL), as one aggregate over the transaction's entries,
-- never in parallel: after a backfill (a few transactions of many entries) the statistics make
-- every transaction look huge, and the generic plan became a parallel one, set up at every
-- COMMIT. A transaction in several currencies (rare) is then checked per currency.
CREATE OR REPLACE FUNCTION ledger_transaction_check() RETURNS trigger
LANGUAGE plpgsql SET enable_seqscan = off SET plan_cache_mode = force_generic_plan
SET max_parallel_workers_per_gather = 0 AS $$
DECLARE
    legs bigint;
    lowest text;
    highest text;
    difference numeric;
    unbalanced text;
    debits numeric;
    credits numeric;
BEGIN
    SELECT count(*), min(currency), max(currency),
           sum(CASE WHEN side = 'debit' THEN amount ELSE -amount END)
      INTO legs, lowest, highest, difference
      FROM ledger_entries WHERE transaction_id = NEW.id;
    IF legs < 2 THEN
        RAISE EXCEPTION 'ledger: transaction % has % entries; at least 2 are required',
            NEW.id, legs USING ERRCODE = 'LD008';
    END IF;
    IF lowest = highest THEN
        unbalanced := CASE WHEN difference <> 0 THEN lowest END;
    ELSE
        SELECT min(per_currency.currency) INTO unbalanced
          FROM (SELECT currency FROM ledger_entries WHERE transaction_id = NEW.id
                 GROUP BY currency
                HAVING sum(CASE WHEN side = 'debit' THEN amount ELSE -amount END) <> 0
               ) per_currency;
    END IF;
    IF unbalanced IS NOT NULL THEN
        SELECT coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0),
               coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0)
          INTO debits, credits
          FROM ledger_entries WHERE transaction_id = NEW.id AND currency = unbalanced;
        RAISE EXCEPTION 'ledger: transaction % does not balance in %: debits %, credits %',
            NEW.id, unbalanced, debits, credits USING ERRCODE = 'LD006';
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS ledger_transactions_balanced ON ledger_transactions;
CREATE CONSTRAINT TRIGGER ledger_transactions_balanced AFTER INSERT ON ledger_transactions
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_transaction_check();

-- An entry's account exists and holds the entry's currency, and its transaction exists and is
-- this database transaction's: ledger_entry_apply checks all of it for every insert, raw ones
-- too, under the account's row lock. Transactions are never deleted or changed
-- (ledger_refuse_change), nor is an account's id or currency (ledger_account_guard), nor is an
-- account with entries deleted (ledger_account_delete_refuse), so what the check saw stays true.
-- The foreign keys that said the same (ledger 0012 drops them) re-read and key-share-locked
-- both rows once per entry, the transaction's again at COMMIT.
ALTER TABLE ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_fk_account_currency;

CREATE OR REPLACE FUNCTION ledger_account_delete_refuse() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.entry_count > 0 THEN
        RAISE EXCEPTION 'ledger: account % has % entries and cannot be deleted', OLD.id,
            OLD.entry_count USING ERRCODE = 'LD009';
    END IF;
    RETURN OLD;
END $$;

DROP TRIGGER IF EXISTS ledger_accounts_kept ON ledger_accounts;
CREATE TRIGGER ledger_accounts_kept BEFORE DELETE ON ledger_accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_account_delete_refuse();

-- The one posting path, in one round trip. `legs` is a JSON array of
-- {"account_id", "side", "amount", "currency"}. Idempotent on (namespace, reference_id): a replay
-- with the same kind and legs returns the first transaction (created = false); different legs
-- are refused (LD001). Entries are inserted in account order, so concurrent postings lock
-- accounts in one global order and cannot deadlock each other.
CREATE OR REPLACE FUNCTION ledger_post_transaction(
    p_namespace text, p_reference_id text, p_kind text, p_metadata jsonb, p_legs jsonb,
    OUT transaction_id bigint, OUT created boolean
) LANGUAGE plpgsql AS $$
DECLARE
    v_fingerprint text;
    v_existing text;
BEGIN
    -- The legs' fingerprint (what a replay must repeat: the kind and the legs in account
    -- order) and the transaction, in one statement.
    WITH legs AS (
        SELECT encode(sha256(convert_to(p_kind || '|' || string_agg(
                   concat_ws(':', l.account_id, l.side, l.amount::numeric(38, 6)::text,
                             l.currency),
                   ',' ORDER BY l.account_id, l.side, l.amount, l.currency), 'UTF8')),
                   'hex') AS fingerprint
          FROM jsonb_to_recordset(p_legs) AS l(account_id bigint, side text, amount numeric,
                                               currency text)
    ), opened AS (
        INSERT INTO ledger_transactions (namespace, reference_id, kind, metadata, fingerprint)
        SELECT p_namespace, p_reference_id, p_kind, coalesce(p_metadata, '{}'), legs.fingerprint
          FROM legs
        ON CONFLICT (namespace, reference_id) DO NOTHING
        RETURNING id
    )
    SELECT (SELECT opened.id FROM opened), legs.fingerprint INTO transaction_id, v_fingerprint
      FROM legs;

    IF transaction_id IS NULL THEN
        SELECT t.id, t.fingerprint INTO transaction_id, v_existing
          FROM ledger_transactions t
         WHERE t.namespace = p_namespace AND t.reference_id = p_reference_id;
        IF v_existing IS DISTINCT FROM v_fingerprint THEN
            RAISE EXCEPTION 'ledger: reference %:% was already posted with different legs',
                p_namespace, p_reference_id USING ERRCODE = 'LD001';
        END IF;
        created := false;
        RETURN;
    END IF;

    INSERT INTO ledger_entries (transaction_id, account_id, currency, side, amount)
    SELECT transaction_id, l.account_id, l.currency, l.side, l.amount
      FROM jsonb_to_recordset(p_legs) AS l(account_id bigint, side text, amount numeric,
                                           currency text)
     ORDER BY l.account_id, l.side, l.amount;
    created := true;
END $$;

-- An account's balance, entry count and chain head move only with its entries: the one UPDATE
-- allowed to change them is ledger_entry_apply's, which runs inside the entry's insert trigger
-- (so this trigger fires one level deeper) and moves the account one entry on: the count by
-- one, the chain to a new head. Currency and normal balance (nor its id, which entries name)
-- never change once an account exists. Anything else (a raw UPDATE, the ORM, another trigger
-- that moves a balance) is refused. The WHEN clause lets the entry's update through without
-- calling the function, which every posting's two account updates called before (with a read
-- of the call stack, GET DIAGNOSTICS PG_CONTEXT): about a twelfth of a shadow mutation's time in
-- PostgreSQL. Neither form stops a writer who means to get past it (a trigger of its own that
-- moves the count and the head too; a comment naming ledger_entry_apply in its statement passed
-- the call-stack read; the table's owner can disable the trigger): `ledger verify` recomputes
-- every balance, count and chain from the entries.
CREATE OR REPLACE FUNCTION ledger_account_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.currency IS DISTINCT FROM OLD.currency
       OR NEW.normal_balance IS DISTINCT FROM OLD.normal_balance THEN
        RAISE EXCEPTION 'ledger: account % keeps its id, currency and normal balance', OLD.id
            USING ERRCODE = 'LD009';
    END IF;
    IF (NEW.balance, NEW.entry_count, NEW.last_hash)
       IS DISTINCT FROM (OLD.balance, OLD.entry_count, OLD.last_hash)
       AND NOT (pg_trigger_depth() >= 2 AND NEW.entry_count = OLD.entry_count + 1
                AND NEW.last_hash <> OLD.last_hash) THEN
        RAISE EXCEPTION 'ledger: account % balance, entry count and hash chain move only by '
            'posting entries', OLD.id USING ERRCODE = 'LD009';
    END IF;
    RETURN NEW;
END $$;

-- (pg_trigger_depth() in WHEN is the updating statement's depth: 1 inside ledger_entry_apply;
-- in the function, one more.)
DROP TRIGGER IF EXISTS ledger_accounts_guard ON ledger_accounts;
CREATE TRIGGER ledger_accounts_guard
    BEFORE UPDATE OF id, balance, entry_count, last_hash, currency, normal_balance ON ledger_accounts
    FOR EACH ROW
    WHEN (NOT coalesce(pg_trigger_depth() >= 1 AND NEW.entry_count = OLD.entry_count + 1
                       AND NEW.last_hash <> OLD.last_hash, false)
          OR NEW.id IS DISTINCT FROM OLD.id OR NEW.currency IS DISTINCT FROM OLD.currency
          OR NEW.normal_balance IS DISTINCT FROM OLD.normal_balance)
    EXECUTE FUNCTION ledger_account_guard();

-- What an account is (a user's, never negative; or a system account, named by its code; its
-- normal balance a side) is set when it opens and, for the normal balance, never changes. As
-- CHECK constraints these rules were prepared again at every UPDATE of the table, two per
-- posting (PostgreSQL re-reads a table's CHECK expressions for every statement that writes it):
-- about a tenth of a shadow mutation's time in PostgreSQL. This trigger holds them only when
-- those columns are written, under the constraints' names and SQLSTATE (23514), so an insert or
-- update that breaks one fails as it did. The balance's own rule stays a CHECK
-- (ledger_accounts_chk_non_negative): it is what every posting writes.
CREATE OR REPLACE FUNCTION ledger_account_kind_check() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_broken text;
BEGIN
    v_broken := CASE
        WHEN NOT (NEW.user_id IS NULL OR NOT NEW.allow_negative)
            THEN 'ledger_accounts_chk_user_never_negative'
        WHEN NOT ((NEW.user_id IS NULL AND NEW.code IS NOT NULL)
                  OR (NEW.user_id IS NOT NULL AND NEW.code IS NULL))
            THEN 'ledger_accounts_chk_user_or_system'
        WHEN NOT (NEW.normal_balance IN ('debit', 'credit'))
            THEN 'ledger_accounts_chk_normal_balance'
    END;
    IF v_broken IS NOT NULL THEN
        RAISE EXCEPTION 'new row for relation "ledger_accounts" violates check constraint "%"',
            v_broken USING ERRCODE = 'check_violation', CONSTRAINT = v_broken,
            TABLE = 'ledger_accounts';
    END IF;
    RETURN NEW;
END $$;

-- (Named to fire after ledger_accounts_guard and ledger_accounts_opened_empty, as the CHECKs did.)
DROP TRIGGER IF EXISTS ledger_accounts_rules ON ledger_accounts;
CREATE TRIGGER ledger_accounts_rules
    BEFORE INSERT OR UPDATE OF user_id, code, allow_negative, normal_balance ON ledger_accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_account_kind_check();
ALTER TABLE ledger_entries
    DROP CONSTRAINT IF EXISTS ledger_entries_chk_positive,
    DROP CONSTRAINT IF EXISTS ledger_entries_chk_side;
ALTER TABLE ledger_accounts
    DROP CONSTRAINT IF EXISTS ledger_accounts_chk_user_never_negative,
    DROP CONSTRAINT IF EXISTS ledger_accounts_chk_user_or_system,
    DROP CONSTRAINT IF EXISTS ledger_accounts_chk_normal_balance;

-- An account opens empty: balance 0, no entries, the chain at its genesis hash. (Without this an
-- INSERT naming a balance would mint money that no entry ever moved; ledger_account_guard only
-- sees updates.)
CREATE OR REPLACE FUNCTION ledger_account_opened_empty() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.balance <> 0 OR NEW.entry_count <> 0 OR NEW.last_hash <> repeat('0', 64) THEN
        RAISE EXCEPTION 'ledger: an account opens with balance 0, no entries and the genesis '
            'hash (got balance %, % entries)', NEW.balance, NEW.entry_count
            USING ERRCODE = 'LD009';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS ledger_accounts_opened_empty ON ledger_accounts;
CREATE TRIGGER ledger_accounts_opened_empty
    BEFORE INSERT ON ledger_accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_account_opened_empty();

-- What other apps read and write of the ledger, so that none of them reads its tables. Views
-- and a LANGUAGE sql IMMUTABLE function are inlined by the planner: a query through them plans
-- as one on ledger_accounts (a user's account is found through cutover's unique index on
-- (user_id) for balance accounts).

-- The account type of a user's balance account in `currency` (ledger.selectors.user_account_type).
CREATE OR REPLACE FUNCTION ledger_user_account_type(p_currency text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT lower(p_currency) || '_balance'
$$;

-- Users' balance accounts (at most one per user), with their cached balances.
CREATE OR REPLACE VIEW ledger_user_balances AS
SELECT a.user_id, a.currency, a.id AS account_id, a.balance, a.entry_count
  FROM ledger_accounts a
 WHERE a.user_id IS NOT NULL AND a.account_type = ledger_user_account_type(a.currency);

-- System accounts by code (buffers, clearing shards, opening-balance equity, fees).
CREATE OR REPLACE VIEW ledger_system_balances AS
SELECT a.code, a.currency, a.id AS account_id, a.balance, a.entry_count
  FROM ledger_accounts a
 WHERE a.user_id IS NULL;

-- Opens users' balance accounts, user i's in currency i (credit-normal, never negative), in
-- one statement; skips an account that a unique rule refuses (it exists, or cutover's one
-- balance account per user). How many were opened.
CREATE OR REPLACE FUNCTION ledger_user_accounts_open(p_user_ids uuid[], p_currencies text[])
RETURNS int LANGUAGE sql AS $$
    WITH opened AS (
        INSERT INTO ledger_accounts
            (user_id, account_type, currency, normal_balance, allow_negative)
        SELECT u.user_id, ledger_user_account_type(u.currency), u.currency, 'credit', false
          FROM unnest(p_user_ids, p_currencies) AS u(user_id, currency)
         ORDER BY u.user_id
        ON CONFLICT DO NOTHING
        RETURNING 1)
    SELECT count(*)::int FROM opened
$$;

-- One user's (the balance path's first mutation of a user).
CREATE OR REPLACE FUNCTION ledger_user_account_open(p_user_id uuid, p_currency text)
RETURNS void LANGUAGE sql AS $$
    SELECT ledger_user_accounts_open(ARRAY[p_user_id], ARRAY[p_currency])
$$;

-- The deployment checklist's names (deploy/checklist/ledger-deployment-checklist.md), so that its
-- SQL runs as written. Its double-entry integrity query reads an entry's side as `entry_type`:
-- a stored generated column, so it can never disagree with `side` (adding it rewrites the table
-- once, under an exclusive lock).
ALTER TABLE ledger_entries
    ADD COLUMN IF NOT EXISTS entry_type varchar(6) GENERATED ALWAYS AS (side) STORED;

-- Its Phase 4.2 times a user's balance read from the ledger through v_user_balances.
CREATE OR REPLACE VIEW v_user_balances AS
SELECT b.user_id, b.currency, b.balance, b.account_id, b.entry_count
  FROM ledger_user_balances b;
