DROP TRIGGER IF EXISTS cutover_phase_audit_append_only ON cutover_phase_audit;
DROP FUNCTION IF EXISTS cutover_refuse_change();
