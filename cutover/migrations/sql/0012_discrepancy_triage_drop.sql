-- The way down from 0012: refused once a discrepancy was triaged or repaired, or a
-- known-difference rule made (the older schema has only open and resolved, and no rules or
-- repairs: they would be lost). Then 0011's SQL is installed again (the balance path's
-- ON CONFLICT as it was).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM cutover_discrepancies WHERE status NOT IN ('open', 'resolved'))
       OR EXISTS (SELECT 1 FROM cutover_discrepancy_repairs)
       OR EXISTS (SELECT 1 FROM cutover_known_differences) THEN
        RAISE EXCEPTION 'cutover 0012 cannot be unapplied: discrepancies were triaged or repaired (cutover_discrepancy_repairs, cutover_known_differences)'
            USING ERRCODE = 'CU009';
    END IF;
END $$;

DROP TRIGGER IF EXISTS cutover_discrepancy_transition ON cutover_discrepancies;
DROP TRIGGER IF EXISTS cutover_discrepancy_repair_decided ON cutover_discrepancy_repairs;
DROP TRIGGER IF EXISTS cutover_known_difference_kept ON cutover_known_differences;
DROP FUNCTION IF EXISTS cutover_discrepancy_transition();
DROP FUNCTION IF EXISTS cutover_discrepancy_repair_decided();
DROP FUNCTION IF EXISTS cutover_known_difference_kept();
