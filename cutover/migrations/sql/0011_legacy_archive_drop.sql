-- The way down from 0011: refused once the legacy store is archived (its record and the
-- archive in legacy_archive would be lost, and cutover could be left with no legacy store).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM cutover_legacy_archives) THEN
        RAISE EXCEPTION 'cutover 0011 cannot be unapplied: the legacy store was archived (cutover_legacy_archives, schema legacy_archive)'
            USING ERRCODE = 'CU008';
    END IF;
END $$;

DROP TRIGGER IF EXISTS cutover_phase_archived_stays ON cutover_phase_state;
DROP TRIGGER IF EXISTS cutover_legacy_archive_check ON cutover_legacy_archives;
DROP TRIGGER IF EXISTS cutover_legacy_archives_append_only ON cutover_legacy_archives;
DROP FUNCTION IF EXISTS cutover_phase_archived_stays();
DROP FUNCTION IF EXISTS cutover_legacy_archive_check();
DROP FUNCTION IF EXISTS cutover_legacy_archived_refuse();
DROP SCHEMA IF EXISTS legacy_archive;
