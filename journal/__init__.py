"""The durable LMDB journal of overlayd.

- store.py    Journal: opening (checked first), transactions, reads, the map's growth, the reserve
- txn.py      WriteTxn: what a transaction can write
- records.py  keys (fixed-width big-endian), JSON values, the schema's upgrade, encode_event
- check.py    check_file (the meta pages, before LMDB maps the file) and probe (every page, in a child)
- errors.py   JournalError and its kinds
"""

from .errors import JournalDamaged, JournalError, JournalFull, SchemaError
from .records import SCHEMA_VERSION, encode_event
from .store import Journal
from .txn import WriteTxn

__all__ = ["SCHEMA_VERSION", "Journal", "JournalDamaged", "JournalError", "JournalFull", "SchemaError", "WriteTxn",
           "encode_event"]
