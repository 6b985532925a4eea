"""The write transaction handed to the function given to Journal.transact."""

from contextlib import contextmanager

import lmdb

from .errors import JournalError
from .records import (_HWM_KEY, _STEP, _U64, _check_rec, _delete_prefix, _dump, _last_key, _load, _read_meta,
                      _read_saga, _read_step_bases, _read_step_paths, _read_steps, encode_event)

class WriteTxn:
    """The write transaction handed to the function given to Journal.transact."""

    def __init__(self, txn, dbs):
        self._txn = txn
        self._dbs = dbs
        self._map_full = False

    def _t(self):
        if self._txn is None:
            raise JournalError("write transaction is finished; use it only "
                               "inside the function passed to transact()")
        return self._txn

    @contextmanager
    def _op(self):
        """The raw txn, noting a full map so transact retries even if fn swallows it."""
        try:
            yield self._t()
        except lmdb.MapFullError:
            self._map_full = True
            raise

    def _put(self, key, value, db, **kw):
        with self._op() as txn:
            return txn.put(key, value, db=self._dbs[db], **kw)

    def new_saga_id(self):
        """Next saga id: one above both the newest saga and any id handed out."""
        txn = self._t()
        last = max(_last_key(txn, self._dbs["sagas"], _U64),
                   self.get_meta(_HWM_KEY, 0))
        self.set_meta(_HWM_KEY, last + 1)
        return last + 1

    def put_saga(self, saga_id, rec):
        _check_rec(rec, id=saga_id)
        self._put(_U64.pack(saga_id), _dump(rec), "sagas")

    def put_step(self, saga_id, index, rec):
        _check_rec(rec, saga=saga_id, index=index)
        if "paths" in rec:
            raise ValueError("a step's paths are stored with put_step_paths, not in its record")
        self._put(_STEP.pack(saga_id, index), _dump(rec), "steps")

    def put_step_paths(self, saga_id, index, paths):
        """The paths a step changed, with their base identities ({path: identity}). Kept apart
        from the step's record, which every step transition reads: 10,000 paths are about 1 MB
        of JSON."""
        if not isinstance(paths, dict):
            raise TypeError(f"paths must be a dict, not {type(paths).__name__}")
        self._put(_STEP.pack(saga_id, index), _dump(paths), "paths")

    def step_paths(self, saga_id):
        """{step index: paths} of a saga's steps that recorded any."""
        return _read_step_paths(self._t(), self._dbs, saga_id)

    def put_step_bases(self, saga_id, index, bases):
        """What a step kept of the base ({path: record}, see Journal.step_bases); an empty dict
        writes nothing."""
        if not isinstance(bases, dict):
            raise TypeError(f"bases must be a dict, not {type(bases).__name__}")
        if bases:
            self._put(_STEP.pack(saga_id, index), _dump(bases), "bases")

    def step_bases(self, saga_id):
        return _read_step_bases(self._t(), self._dbs, saga_id)

    def delete_step(self, saga_id, index):
        """Delete one step (and its paths); returns whether it existed."""
        key = _STEP.pack(saga_id, index)
        with self._op() as txn:
            txn.delete(key, db=self._dbs["paths"])
            txn.delete(key, db=self._dbs["bases"])
            return txn.delete(key, db=self._dbs["steps"])

    def delete_saga(self, saga_id):
        """Delete a saga and all its steps; returns whether the saga existed."""
        prefix = _U64.pack(saga_id)
        with self._op() as txn:
            _delete_prefix(txn, self._dbs["steps"], prefix)
            _delete_prefix(txn, self._dbs["paths"], prefix)
            _delete_prefix(txn, self._dbs["bases"], prefix)
            return txn.delete(prefix, db=self._dbs["sagas"])

    def delete_events(self, saga_id):
        """Delete every event of a saga (retention); returns how many went."""
        with self._op() as txn:
            db = self._dbs["events"]
            doomed = [key for key, raw in txn.cursor(db=db) if _load(raw).get("saga") == saga_id]
            for key in doomed:
                txn.delete(key, db=db)
        return len(doomed)

    def event(self, kind, saga=None, step=None, **details):
        """Append an event; returns its sequence number."""
        return self.append_events([encode_event(kind, saga, step, **details)])

    def append_events(self, values):
        """Append events made by :func:`encode_event` (outside the transaction, so that the
        write lock is held only for the puts); returns the last sequence number."""
        seq = _last_key(self._t(), self._dbs["events"], _U64)
        if not values:
            return seq
        first = seq + 1
        items = [(_U64.pack(first + i), v) for i, v in enumerate(values)]
        with self._op() as txn:
            added = txn.cursor(db=self._dbs["events"]).putmulti(items, append=True)[1]
        if added != len(items):
            raise JournalError(f"events {first}.. are not past the end of the log")
        return first + len(items) - 1

    def set_meta(self, key, value):
        self._put(key.encode("utf-8"), _dump(value), "meta")

    def get_meta(self, key, default=None):
        return _read_meta(self._t(), self._dbs, key, default)

    def saga(self, saga_id):
        return _read_saga(self._t(), self._dbs, saga_id)

    def steps(self, saga_id):
        return _read_steps(self._t(), self._dbs, saga_id)
