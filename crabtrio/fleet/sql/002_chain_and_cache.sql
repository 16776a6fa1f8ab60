-- crabtrio fleet schema, version 2: columns for the fields records gained, so that shipping
-- keeps its typed fast path: the hash chain's `seq` and `chain` (see audit/chain.py), and
-- the Messages API's prompt-cache token counts. Rows shipped before keep NULL in them.
ALTER TABLE {table}
    ADD COLUMN IF NOT EXISTS cache_read_tokens bigint,
    ADD COLUMN IF NOT EXISTS cache_creation_tokens bigint,
    ADD COLUMN IF NOT EXISTS seq bigint,
    ADD COLUMN IF NOT EXISTS chain text;
