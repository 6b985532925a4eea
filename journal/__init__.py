"""The durable LMDB journal of overlayd."""

from journal.store import (
    SCHEMA_VERSION,
    Journal,
    JournalDamaged,
    JournalError,
    JournalFull,
    SchemaError,
    WriteTxn,
    encode_event,
)

__all__ = ["SCHEMA_VERSION", "Journal", "JournalDamaged", "JournalError", "JournalFull", "SchemaError", "WriteTxn",
           "encode_event"]
