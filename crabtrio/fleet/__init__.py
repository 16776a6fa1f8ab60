"""Fleet features: shipping the audit log to PostgreSQL and querying every replica's records.

Imported only when `[audit.postgres]` is configured (the shipper and the queries import
asyncpg and trio-asyncio).
"""
