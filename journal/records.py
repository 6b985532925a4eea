"""The journal's records: keys (fixed-width big-endian), JSON values, the schema's upgrade."""

import json
import struct
import time

SCHEMA_VERSION = 2  # 2: a step's recorded paths live in "paths", not in its record
DB_NAMES = ("meta", "sagas", "steps", "events", "paths", "bases")
#: Sub-databases added without a schema change: a read-write open creates them, a read-only open
#: of a journal no daemon of this version has opened yet reads them as empty.
OPTIONAL_DBS = ("bases",)

_U64 = struct.Struct(">Q")
_STEP = struct.Struct(">QI")
_HWM_KEY = "last_saga_id"  # meta: highest saga id ever handed out


def _dump(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _load(raw):
    return json.loads(raw)


def _saga_rec(saga_id, raw):
    rec = {"id": saga_id}
    rec.update(_load(raw))
    return rec


def _step_rec(key, raw):
    saga_id, index = _STEP.unpack(key)
    rec = {"saga": saga_id, "index": index}
    rec.update(_load(raw))
    return rec


def _event_rec(key, raw):
    rec = {"seq": _U64.unpack(key)[0]}
    rec.update(_load(raw))
    return rec


def _check_rec(rec, **ids):
    if not isinstance(rec, dict):
        raise TypeError(f"record must be a dict, not {type(rec).__name__}")
    for name, value in ids.items():
        if name in rec and rec[name] != value:
            raise ValueError(f"record has {name}={rec[name]!r} but is stored "
                             f"under {name}={value!r}")


def _read_saga(txn, dbs, saga_id):
    raw = txn.get(_U64.pack(saga_id), db=dbs["sagas"])
    return None if raw is None else _saga_rec(saga_id, raw)


def _read_steps(txn, dbs, saga_id):
    prefix = _U64.pack(saga_id)
    out = []
    cur = txn.cursor(db=dbs["steps"])
    if cur.set_range(prefix):
        for key, raw in cur:
            if key[:8] != prefix:
                break
            out.append(_step_rec(key, raw))
    return out


def _read_per_step(txn, db, saga_id):
    """{step index: record} of a sub-database keyed by (saga id, step index)."""
    prefix = _U64.pack(saga_id)
    out = {}
    cur = txn.cursor(db=db)
    if cur.set_range(prefix):
        for key, raw in cur:
            if key[:8] != prefix:
                break
            out[_STEP.unpack(key)[1]] = _load(raw)
    return out


def _read_step_paths(txn, dbs, saga_id):
    return _read_per_step(txn, dbs["paths"], saga_id)


def _read_step_bases(txn, dbs, saga_id):
    """{step index: {path: base record}} (the "bases" sub-database: see Journal.step_bases)."""
    if "bases" not in dbs:
        return {}
    return _read_per_step(txn, dbs["bases"], saga_id)


def _delete_prefix(txn, db, prefix):
    cur = txn.cursor(db=db)
    if cur.set_range(prefix):
        while cur.key()[:8] == prefix:
            if not cur.delete():  # delete moves to the next record
                break


def _upgrade_1_to_2(txn, dbs):
    """Schema 1 kept a step's paths in its record: move them to the "paths" sub-database."""
    moved = []
    for key, raw in txn.cursor(db=dbs["steps"]):
        rec = _load(raw)
        if "paths" in rec:
            moved.append((key, rec))
    for key, rec in moved:
        txn.put(key, _dump(rec.pop("paths") or {}), db=dbs["paths"])
        txn.put(key, _dump(rec), db=dbs["steps"])
    txn.put(b"schema_version", _dump(2), db=dbs["meta"])


def _read_meta(txn, dbs, key, default):
    raw = txn.get(key.encode("utf-8"), db=dbs["meta"])
    return default if raw is None else _load(raw)


def _last_key(txn, db, fmt):
    cur = txn.cursor(db=db)
    return fmt.unpack(cur.key())[0] if cur.last() else 0


def encode_event(kind, saga=None, step=None, ts=None, **details):
    """The stored form of one event (its sequence number is its key, given when appended).
    *ts* defaults to now."""
    if "seq" in details:
        raise ValueError("event detail 'seq' is reserved")
    rec = {"ts": time.time() if ts is None else ts, "saga": saga, "step": step, "kind": kind}
    rec.update(details)
    return _dump(rec)

