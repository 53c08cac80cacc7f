-- The way down from 0016: the backfill's chunk function goes with its tables.
DROP FUNCTION IF EXISTS cutover_backfill_chunk(bigint, int);
