DROP TRIGGER IF EXISTS cutover_balance_mutations_append_only ON cutover_balance_mutations;
DROP TRIGGER IF EXISTS cutover_phase_audit_append_only ON cutover_phase_audit;
DROP FUNCTION IF EXISTS cutover_refuse_change();
DROP FUNCTION IF EXISTS cutover_balance_mutate(uuid, text, numeric, text, text, text, text, text);
