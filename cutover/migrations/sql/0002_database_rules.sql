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
