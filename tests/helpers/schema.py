"""Older server database schemas, for the tests that upgrade them: SQL
that takes a database made by the current server back to what an older
version had (rows kept)."""

from __future__ import annotations

__all__ = ["UNDO_V3"]

#: Schema version 3 added the change feed: sequence numbers and tombstones.
UNDO_V3 = (
    "DROP TABLE tombstones",
    "DROP INDEX nodes_seq",
    "ALTER TABLE nodes DROP COLUMN seq",
    "ALTER TABLE accounts DROP COLUMN change_seq",
    "ALTER TABLE accounts DROP COLUMN pruned_seq",
    "UPDATE server_config SET value = '2' WHERE key = 'schema_version'",
)
