-- The way down from 0019 (after 0018's SQL is run again, which brings back the run-wide
-- cutover_backfill_chunk): the range chunk function goes; the ranges table stays (its rows are
-- the record of runs already made, and 0019 makes it only if missing).
DROP FUNCTION IF EXISTS cutover_backfill_range_chunk(bigint, int);
