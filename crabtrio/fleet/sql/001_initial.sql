-- crabtrio fleet schema, version 1. `{table}` is the configured table name (validated as an
-- identifier). Records are partitioned by day on `timestamp` (milliseconds since the epoch,
-- as in the JSONL file); partitions are created ahead by the shipper and dropped by retention.
CREATE TABLE IF NOT EXISTS {table} (
    request_id text COLLATE "C" NOT NULL,  -- byte order, as the local index and cursors
    timestamp bigint NOT NULL,
    key_name text NOT NULL,
    model text NOT NULL,
    provider text NOT NULL,
    prompt_tokens bigint,
    completion_tokens bigint,
    cost_micros bigint NOT NULL,
    latency_ms bigint NOT NULL,
    status integer NOT NULL,
    stream boolean,
    endpoint text,
    error text,
    -- Fields this schema has no column for yet (records of a newer gateway), kept whole.
    extra jsonb,
    instance text NOT NULL,
    -- A re-sent record is a no-op. The partition key must be part of a partitioned table's
    -- unique keys; a request id is 128 random bits, so this is unique per record. In this
    -- order it also serves the `instance` filter, newest first (a backward scan).
    PRIMARY KEY (instance, timestamp, request_id)
) PARTITION BY RANGE (timestamp);

CREATE INDEX IF NOT EXISTS {table}_order ON {table} (timestamp DESC, request_id DESC);
CREATE INDEX IF NOT EXISTS {table}_key ON {table} (key_name, timestamp DESC);
CREATE INDEX IF NOT EXISTS {table}_model ON {table} (model, timestamp DESC);
CREATE INDEX IF NOT EXISTS {table}_provider ON {table} (provider, timestamp DESC);
CREATE INDEX IF NOT EXISTS {table}_status ON {table} (status, timestamp DESC);

-- Where each instance's shipper stands: the file it reads (identified by a digest of its
-- first line, which rotation does not change) and the byte offset after the last line shipped.
-- Advanced in the same transaction as the rows it covers.
CREATE TABLE IF NOT EXISTS {table}_checkpoints (
    instance text PRIMARY KEY,
    file_id text NOT NULL,
    file_name text NOT NULL,
    file_offset bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
