"""Durable LMDB journal: sagas, their steps, an event log and metadata."""

import json
import logging
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import lmdb

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: a step's recorded paths live in "paths", not in its record
DB_NAMES = ("meta", "sagas", "steps", "events", "paths")
MAX_MAP_SIZE = 1 << 40  # stop doubling at 1 TiB

_U64 = struct.Struct(">Q")
_STEP = struct.Struct(">QI")
_HWM_KEY = "last_saga_id"  # meta: highest saga id ever handed out


class JournalError(Exception):
    """The journal could not be opened, read or written."""


class SchemaError(JournalError):
    """The journal was written with a schema this program does not support."""


def _dump(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _load(raw):
    return json.loads(raw)


def _hint(exc):
    if isinstance(exc, lmdb.ReadonlyError):
        return "the journal is open readonly; open it read-write to change it"
    if isinstance(exc, lmdb.ReadersFullError):
        return "too many readers; close idle readers or run a reader check"
    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError,
                        lmdb.InvalidError, lmdb.PanicError)):
        return "the journal looks damaged; restore it from a backup"
    if isinstance(exc, lmdb.VersionMismatchError):
        return "the journal was written by an incompatible LMDB version"
    return "check that the path exists, its permissions, and free disk space"


class _Gate:
    """Many transactions at once, or one map resize alone (per process)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False
        self._local = threading.local()

    @contextmanager
    def shared(self):
        depth = getattr(self._local, "depth", 0)
        if not depth:
            with self._cond:
                while self._resizing:
                    self._cond.wait()
                self._active += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if not depth:
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        if getattr(self._local, "depth", 0):
            raise JournalError("cannot resize the journal map while this "
                               "thread has a journal transaction open")
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


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


def _read_step_paths(txn, dbs, saga_id):
    prefix = _U64.pack(saga_id)
    out = {}
    cur = txn.cursor(db=dbs["paths"])
    if cur.set_range(prefix):
        for key, raw in cur:
            if key[:8] != prefix:
                break
            out[_STEP.unpack(key)[1]] = _load(raw)
    return out


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

    def delete_step(self, saga_id, index):
        """Delete one step (and its paths); returns whether it existed."""
        key = _STEP.pack(saga_id, index)
        with self._op() as txn:
            txn.delete(key, db=self._dbs["paths"])
            return txn.delete(key, db=self._dbs["steps"])

    def delete_saga(self, saga_id):
        """Delete a saga and all its steps; returns whether the saga existed."""
        prefix = _U64.pack(saga_id)
        with self._op() as txn:
            _delete_prefix(txn, self._dbs["steps"], prefix)
            _delete_prefix(txn, self._dbs["paths"], prefix)
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


class Journal:
    """An open journal environment at state_dir/journal."""

    def __init__(self, path, env, readonly):
        self.path = path
        self.readonly = readonly
        self._env = env
        self._dbs = None
        self._gate = _Gate()
        self._write_lock = threading.Lock()
        self._writer = None

    @classmethod
    def open(cls, state_dir, *, readonly=False, map_size=64 * 1024 * 1024):
        """Open (or, unless readonly, create) the journal under state_dir."""
        path = Path(state_dir) / "journal"
        if readonly and not (path / "data.mdb").is_file():
            raise JournalError(f"no journal at {path}; start overlayd once to "
                               "create it, or check the state directory")
        try:
            if not readonly:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            env = lmdb.open(str(path), subdir=True, map_size=map_size,
                            max_dbs=8, sync=True, metasync=True,
                            readonly=readonly, lock=True, create=False,
                            mode=0o700)
        except (lmdb.Error, OSError) as e:
            raise JournalError(f"cannot open journal at {path}: {e}; "
                               f"{_hint(e)}") from e
        self = cls(path, env, readonly)
        try:
            stale = self.reader_check()
            if stale:
                log.info("journal %s: cleared %d stale reader(s)", path, stale)
            if readonly:
                self._dbs = self._open_dbs(None, ("meta",))
                self._read(lambda txn: self._check_schema(txn, self._dbs))
                self._dbs = self._open_dbs(None)
            else:
                self._dbs = self._write(lambda txn: (self._setup(txn), False))
        except BaseException:
            env.close()
            raise
        return self

    def _open_dbs(self, txn, names=DB_NAMES):
        """Sub-database handles; created in txn (read-write) or must exist."""
        try:
            return {name: self._env.open_db(name.encode(), txn=txn,
                                            create=not self.readonly)
                    for name in names}
        except lmdb.NotFoundError as e:
            raise JournalError(f"journal at {self.path} is not initialised; "
                               "open it read-write once to set it up") from e
        except lmdb.Error as e:
            raise self._wrap("opening sub-databases", e) from e

    def _setup(self, txn):
        """Create the sub-databases and stamp or check the schema, in txn."""
        dbs = self._open_dbs(txn)
        found = _read_meta(txn, dbs, "schema_version", None)
        if found is None:
            txn.put(b"schema_version", _dump(SCHEMA_VERSION), db=dbs["meta"])
        elif found == 1:
            _upgrade_1_to_2(txn, dbs)
            log.info("journal %s: upgraded from schema version 1 to 2", self.path)
        self._check_schema(txn, dbs)
        return dbs

    def _check_schema(self, txn, dbs):
        found = _read_meta(txn, dbs, "schema_version", None)
        if found != SCHEMA_VERSION:
            newer = isinstance(found, int) and found > SCHEMA_VERSION
            raise SchemaError(
                f"journal at {self.path} has schema version {found!r}; this "
                f"program supports schema version {SCHEMA_VERSION}; "
                + ("upgrade overlayd to read it" if newer
                   else "start overlayd on it once (it upgrades the journal), then retry"
                   if found == 1 else "it cannot be read by this program"))

    def close(self):
        """Close the environment; further calls raise JournalError."""
        if self._writer == threading.get_ident():
            raise JournalError("cannot close the journal inside transact()")
        with self._write_lock, self._gate.exclusive():
            if self._env is not None:
                self._env.close()
                self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live_env(self):
        if self._env is None:
            raise JournalError(f"journal at {self.path} is closed")
        return self._env

    def _wrap(self, what, exc):
        return JournalError(f"{what} failed for journal at {self.path}: "
                            f"{exc}; {_hint(exc)}")

    @contextmanager
    def _quiesced(self):
        """No journal txn of this process in flight; for remaps and write aborts.

        The caller must hold the write lock (or own the write txn). py-lmdb
        can stall a write-txn abort while other threads keep read txns going,
        so aborts also drain readers first.
        """
        with self._gate.exclusive():
            yield

    def _resize(self, grow):
        """Double the map (grow) or adopt a size another process set."""
        if self._writer == threading.get_ident():
            self._remap(grow)
        else:
            with self._write_lock:
                self._remap(grow)

    def _remap(self, grow):
        with self._quiesced():
            env = self._live_env()
            old = env.info()["map_size"]
            new = old * 2 if grow else 0
            if new > MAX_MAP_SIZE:
                raise JournalError(f"journal at {self.path} would exceed "
                                   f"{MAX_MAP_SIZE} bytes; one transaction "
                                   "is writing too much")
            try:
                env.set_mapsize(new)
            except lmdb.Error as e:
                raise self._wrap("resizing the map", e) from e
            if grow:
                log.info("journal %s: map full, grew map from %d to %d bytes",
                         self.path, old, new)
            else:
                log.debug("journal %s: adopted map size %d", self.path,
                          env.info()["map_size"])

    def _write(self, fn):
        """Run fn(raw lmdb txn) -> (result, map_full) in one write txn.

        On a full map the txn is aborted, the map doubled and fn rerun.
        """
        me = threading.get_ident()
        if self._writer == me:
            raise JournalError("transact() is not reentrant; do all the work "
                               "in the outer transaction")
        with self._write_lock:
            self._writer = me
            try:
                while True:
                    env = self._live_env()
                    try:
                        txn = env.begin(write=True)
                    except lmdb.MapResizedError:
                        self._remap(grow=False)
                        continue
                    except lmdb.Error as e:
                        raise self._wrap("starting a write", e) from e
                    committed = full = False
                    try:
                        result, full = fn(txn)
                        if not full:
                            txn.commit()
                            committed = True
                            return result
                    except lmdb.MapFullError:
                        full = True
                    except lmdb.Error as e:
                        raise self._wrap("writing", e) from e
                    finally:
                        if not committed:
                            with self._quiesced():
                                txn.abort()
                    self._remap(grow=True)
            finally:
                self._writer = None

    def transact(self, fn):
        """Call fn(WriteTxn) in one write transaction and return its result.

        On a full map the transaction is aborted, the map doubled and fn
        called again from scratch.
        """
        if self.readonly:
            raise JournalError(f"journal at {self.path} is open readonly")
        dbs = self._dbs

        def attempt(txn):
            wtxn = WriteTxn(txn, dbs)
            try:
                return fn(wtxn), wtxn._map_full
            except lmdb.Error:
                if wtxn._map_full:  # a later failure of a txn that hit MapFull
                    return None, True
                raise
            finally:
                wtxn._txn = None

        return self._write(attempt)

    def _read(self, fn):
        """Run fn(raw lmdb txn) in a read txn, adopting a map grown elsewhere."""
        for _ in range(10):
            with self._gate.shared():
                env = self._live_env()
                try:
                    with env.begin() as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    pass
                except lmdb.Error as e:
                    raise self._wrap("reading", e) from e
            self._resize(grow=False)
        raise JournalError(f"journal at {self.path} keeps being resized by "
                           "another process; try again")

    def saga(self, saga_id):
        return self._read(lambda txn: _read_saga(txn, self._dbs, saga_id))

    def sagas(self):
        def scan(txn):
            cur = txn.cursor(db=self._dbs["sagas"])
            return [_saga_rec(_U64.unpack(k)[0], v) for k, v in cur]
        return self._read(scan)

    def steps(self, saga_id):
        return self._read(lambda txn: _read_steps(txn, self._dbs, saga_id))

    def step_paths(self, saga_id):
        """{step index: {path: base identity}} of a saga's steps that recorded paths."""
        return self._read(lambda txn: _read_step_paths(txn, self._dbs, saga_id))

    def events(self, saga=None, since=0, limit=None):
        """Events with seq > since, oldest first, optionally of one saga only."""
        def scan(txn):
            out = []
            if limit is not None and limit <= 0:
                return out
            cur = txn.cursor(db=self._dbs["events"])
            if not cur.set_range(_U64.pack(max(since, 0) + 1)):
                return out
            for key, raw in cur:
                rec = _event_rec(key, raw)
                if saga is not None and rec["saga"] != saga:
                    continue
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    break
            return out
        return self._read(scan)

    def meta(self, key, default=None):
        return self._read(lambda txn: _read_meta(txn, self._dbs, key, default))

    def stats(self):
        """Map size, bytes in use and entries per sub-database."""
        def collect(txn):
            info = self._env.info()
            psize = self._env.stat()["psize"]
            return {
                "path": str(self.path),
                "map_size": info["map_size"],
                "used_bytes": (info["last_pgno"] + 1) * psize,
                "page_size": psize,
                "last_txnid": info["last_txnid"],
                "entries": {name: txn.stat(db)["entries"]
                            for name, db in self._dbs.items()},
            }
        return self._read(collect)

    def compact(self, threshold=0.5):
        """Rewrite the environment without its free pages when they dominate.

        A compacting copy is made; if it is smaller than *threshold* times the current file,
        it replaces data.mdb (fsynced, then renamed, then the directory fsynced) and the
        environment is reopened. Returns (bytes before, bytes after). Holds the writer lock
        and the gate throughout: no transaction of this process runs meanwhile.
        """
        import os
        import shutil

        if self.readonly:
            raise JournalError("cannot compact a journal opened readonly")
        data = self.path / "data.mdb"
        tmp = self.path.parent / "journal.compact"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            with self._write_lock, self._gate.exclusive():
                before = data.stat().st_size
                env = self._live_env()
                env.copy(str(tmp), compact=True)
                after = (tmp / "data.mdb").stat().st_size
                if after >= before * threshold:
                    return before, before
                fd = os.open(tmp / "data.mdb", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                map_size = env.info()["map_size"]
                env.close()
                self._env = None
                os.replace(tmp / "data.mdb", data)
                dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self._env = lmdb.open(str(self.path), subdir=True, map_size=map_size, max_dbs=8, sync=True,
                                      metasync=True, readonly=False, lock=True, create=False, mode=0o700)
                with self._env.begin(write=True) as txn:
                    self._dbs = {name: self._env.open_db(name.encode(), txn=txn, create=False)
                                 for name in DB_NAMES}
                log.info("journal %s compacted: %d -> %d bytes", self.path, before, after)
                return before, after
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def reader_check(self):
        """Clear reader slots left by dead processes; returns how many."""
        with self._gate.shared():
            try:
                return self._live_env().reader_check()
            except lmdb.Error as e:
                raise self._wrap("checking readers", e) from e
