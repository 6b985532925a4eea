"""Durable LMDB journal: sagas, their steps, an event log and metadata."""

import errno
import json
import logging
import os
import signal
import stat
import struct
import subprocess
import sys
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

# data.mdb's two meta pages (LMDB 0.9, 64-bit): page header (pgno, pad, flags, lower, upper), then
# magic, version, address, map size, two MDB_db records (the first one's md_pad is the page
# size), the last page number in use and the transaction id. LMDB uses the page with the higher
# transaction id.
_PAGE_HEAD = struct.Struct("=QHHHH")
_META = struct.Struct("=IIQQ" + "IHHQQQQQ" * 2 + "QQ")
_P_META = 0x08
_MDB_MAGIC = 0xBEEFC0DE
_MDB_DATA_VERSION = 1
# the layout above is LMDB 0.9's on a 64-bit machine; elsewhere only the probe checks the file
_KNOWN_LAYOUT = lmdb.version()[0] == 0 and struct.calcsize("P") == 8
PROBE_TIMEOUT = 120.0  # seconds a child process may take to read a whole journal

# Room kept ahead of the journal's last page: data.mdb is extended with fallocate so that the
# transactions that free space (a rollback, an abort, the end of a commit) find their pages
# already allocated on a full state filesystem. At most 1/64 of the filesystem, at least 64 KiB.
RESERVE = int(os.environ.get("OVERLAYD_JOURNAL_RESERVE", str(4 << 20)))


class JournalError(Exception):
    """The journal could not be opened, read or written."""


class SchemaError(JournalError):
    """The journal was written with a schema this program does not support."""


class JournalDamaged(JournalError):
    """data.mdb is not a readable LMDB environment (empty, truncated, overwritten): the caller
    must refuse to go on, never start a fresh journal over it."""

    def __init__(self, data, reason):
        self.data = Path(data)
        self.reason = reason
        state = self.data.parent.parent
        super().__init__(
            f"the journal {self.data} cannot be read: {reason}. Nothing was changed. Restore it "
            f"from a backup (while no daemon runs); or, to start over without its sagas, move it "
            f"and the layers aside: mv {self.data.parent} {self.data.parent}.damaged && mv "
            f"{state / 'layers'} {state / 'layers'}.saved (the sagas' changes stay there, one "
            "directory per step)")


class JournalFull(JournalError):
    """The state filesystem has no room for a journal write (ENOSPC, or a map that cannot
    grow). Nothing was written: the caller's state is as before the call."""


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


def _read_meta_page(fd, data, index, offset):
    raw = os.pread(fd, _PAGE_HEAD.size + _META.size, offset)
    if len(raw) < _PAGE_HEAD.size + _META.size:
        raise JournalDamaged(data, f"meta page {index} is cut short")
    pgno, _pad, flags, _lower, _upper = _PAGE_HEAD.unpack_from(raw)
    m = _META.unpack_from(raw, _PAGE_HEAD.size)
    magic, version, psize, last_pg, txnid = m[0], m[1], m[4], m[-2], m[-1]
    if pgno != index or not flags & _P_META or magic != _MDB_MAGIC:
        raise JournalDamaged(data, f"meta page {index} is not an LMDB meta page (overwritten or "
                                   "zeroed, or not an LMDB file)")
    if version != _MDB_DATA_VERSION:
        raise JournalDamaged(data, f"meta page {index} has LMDB data version {version}, this "
                                   f"program reads version {_MDB_DATA_VERSION}")
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        raise JournalDamaged(data, f"meta page {index} gives an impossible page size {psize}")
    return psize, last_pg, txnid


def check_file(data) -> dict:
    """Check data.mdb against its own meta pages without mapping it; raise JournalDamaged.

    LMDB maps the file and trusts its meta pages: a file shorter than the pages its last
    transaction uses is read past its end, and the process dies by SIGBUS; an empty file is
    taken for a new environment. Both meta pages must be valid (LMDB refuses otherwise), and
    the file at least as long as the newer meta page's last page in use (pages past it are
    never read before they are written). Returns {page_size, last_page, txnid, size}.
    """
    data = Path(data)
    try:
        fd = os.open(data, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise JournalDamaged(data, "it is a symbolic link") from None
        raise JournalError(f"cannot open the journal {data}: {e.strerror}; check the state "
                           "directory's permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JournalDamaged(data, "it is not a regular file")
        size = st.st_size
        if size == 0:
            raise JournalDamaged(data, "it is empty (0 bytes)")
        if not _KNOWN_LAYOUT:
            return {"page_size": None, "last_page": None, "txnid": None, "size": size}
        try:
            psize, last0, txn0 = _read_meta_page(fd, data, 0, 0)
            if size < 2 * psize:
                raise JournalDamaged(data, f"it is {size} bytes, shorter than its two {psize}-byte "
                                           "meta pages")
            _, last1, txn1 = _read_meta_page(fd, data, 1, psize)
        except OSError as e:
            raise JournalDamaged(data, f"reading its meta pages failed: {e.strerror}") from None
    finally:
        os.close(fd)
    # (a size that is not a whole number of pages is what a short write on a full disk leaves
    # past the last committed page, and a failed fallocate: harmless while no page in use is cut)
    last, txnid = (last1, txn1) if txn1 > txn0 else (last0, txn0)
    need = (last + 1) * psize
    if size < need:
        raise JournalDamaged(data, f"it is {size} bytes but its last transaction ({txnid}) uses "
                                   f"{need}: it was cut short")
    return {"page_size": psize, "last_page": last, "txnid": txnid, "size": size}


_PROBE = """
import os, sys
import lmdb
try:
    env = lmdb.open(sys.argv[1], subdir=True, readonly=True, lock=sys.argv[2] == "1",
                    create=False, max_dbs=16)
    fd = os.open(os.devnull, os.O_WRONLY)
    env.copyfd(fd, compact=True)  # walks every tree, page and overflow page in use
    env.close()
except lmdb.Error as e:
    sys.stderr.write(type(e).__name__ + ": " + str(e))
    # not the file's fault: permissions, memory, descriptors, the reader table
    sys.exit(4 if isinstance(e, lmdb.ReadersFullError) or any(
        w in str(e) for w in ("Permission denied", "Operation not permitted", "Cannot allocate memory",
                              "Too many open files", "Resource temporarily unavailable")) else 3)
"""


def probe(path, lock=True, timeout=PROBE_TIMEOUT) -> None:
    """Read every page the journal at *path* uses, in a child process; raise JournalDamaged.

    A damaged page deep in a B-tree can make LMDB read through a wild pointer and crash the
    process that maps it (SIGSEGV, SIGBUS, an assertion): the child dies, not the caller. The
    child makes a compacting copy to /dev/null, which walks every database of the environment
    (not the free-page list). About 40 ms for a small journal, mostly the interpreter's start.
    """
    data = Path(path) / "data.mdb"
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), "1" if lock else "0"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise JournalDamaged(data, f"reading it took more than {timeout:.0f} s") from None
    except OSError as e:
        raise JournalError(f"cannot start a process to check the journal {data}: {e}") from None
    if proc.returncode == 0:
        return
    err = proc.stderr.decode("utf-8", "replace").strip()[-500:]
    if proc.returncode < 0:
        try:
            signame = signal.Signals(-proc.returncode).name
        except ValueError:
            signame = f"signal {-proc.returncode}"
        raise JournalDamaged(data, f"reading it crashed the reading process ({signame})"
                             + (f": {err}" if err else ""))
    if proc.returncode == 4:
        raise JournalError(f"cannot read the journal {data}: {err}; check the permissions of the "
                           "state directory and that no other program holds the journal")
    raise JournalDamaged(data, f"LMDB cannot read it: {err or f'exit status {proc.returncode}'}")


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
        self._create = True
        self._psize = 4096
        self._file_size = 0  # data.mdb's size as last extended or seen
        self._reserve = RESERVE  # bytes kept past the last page (keep_reserve)
        self.low_space = False  # the reserve could not be kept: the state filesystem is full

    @classmethod
    def open(cls, state_dir, *, readonly=False, map_size=64 * 1024 * 1024, create=True, verify=True):
        """Open (or, unless readonly, create) the journal under state_dir.

        An existing data.mdb is checked before LMDB maps it (check_file; then probe, in a child
        process, when *verify*): a damaged one raises JournalDamaged and is left as it is, never
        replaced by a fresh journal. *create*=False: a missing journal, or one created but never
        initialised, raises JournalError instead of being set up.
        """
        path = Path(state_dir) / "journal"
        data = path / "data.mdb"
        if os.path.lexists(data):
            check_file(data)
            if verify:
                probe(path)
        elif readonly:
            raise JournalError(f"no journal at {path}; start overlayd once to "
                               "create it, or check the state directory")
        elif not create:
            raise JournalError(f"no journal at {path} (no data.mdb)")
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
        self._create = create
        try:
            stale = self.reader_check()
            if stale:
                log.info("journal %s: cleared %d stale reader(s)", path, stale)
            if readonly:
                self._dbs = self._open_dbs(None, ("meta",))
                self._read(lambda txn: self._check_schema(txn, self._dbs))
                self._dbs = self._open_dbs(None)
            else:
                self._psize = env.stat()["psize"]
                self._reserve = self._reserve_size()
                self._dbs = self._write(lambda txn: (self._setup(txn), False))
                self.keep_reserve()
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
        if found is None and not self._create:
            raise JournalDamaged(self.path / "data.mdb", "it holds no records (it was created but "
                                                         "never initialised)")
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
                raise JournalFull(f"journal at {self.path} would exceed "
                                  f"{MAX_MAP_SIZE} bytes; one transaction "
                                  "is writing too much")
            try:
                env.set_mapsize(new)
            except lmdb.Error as e:
                raise JournalFull(f"the journal at {self.path} is full and its map cannot grow "
                                  f"from {old} to {new} bytes: {e}; nothing was written") from e
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
                            self.keep_reserve()
                            return result
                    except lmdb.MapFullError:
                        full = True
                    except lmdb.Error as e:
                        raise self._write_failed(e) from e
                    finally:
                        if not committed:
                            with self._quiesced():
                                txn.abort()
                    self._remap(grow=True)
            finally:
                self._writer = None

    def _free_bytes(self):
        try:
            sv = os.statvfs(self.path)
        except OSError:
            return None
        return (sv.f_bfree if os.geteuid() == 0 else sv.f_bavail) * sv.f_frsize

    def _write_failed(self, exc):
        """The error for a failed write: JournalFull when the filesystem is (nearly) full.
        LMDB reports a short write as EIO, so the free space decides."""
        free = self._free_bytes()
        if free is not None and free < 2 * max(self._reserve, 1 << 20):
            return JournalFull(f"the state filesystem of the journal {self.path} is full "
                               f"({free // 1024} KiB free; LMDB: {exc}); nothing was written")
        return self._wrap("writing", exc)

    def _reserve_size(self):
        if RESERVE <= 0:
            return 0
        try:
            sv = os.statvfs(self.path)
        except OSError:
            return RESERVE
        return -(-max(64 << 10, min(RESERVE, sv.f_blocks * sv.f_frsize // 64)) // self._psize) * self._psize

    def keep_reserve(self):
        """Keep the reserve allocated in data.mdb past its last page in use (fallocate), so
        that a write that frees space finds room on a full filesystem. Never raises: when the
        room cannot be kept, ``low_space`` is set and transact() keeps what is left for the
        essential writes."""
        env = self._env
        if self.readonly or self._reserve <= 0 or env is None:
            return
        used = (env.info()["last_pgno"] + 1) * self._psize
        if used + self._reserve // 2 <= self._file_size:
            return
        want = used + self._reserve
        try:
            fd = os.open(self.path / "data.mdb", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            log.warning("journal %s: cannot open data.mdb to keep room in it: %s", self.path, e)
            return
        try:
            self._file_size = os.fstat(fd).st_size
            if self._file_size < want:
                os.posix_fallocate(fd, 0, want)
                self._file_size = want
        except OSError as e:
            try:
                self._file_size = os.fstat(fd).st_size
            except OSError:
                pass
            if not self.low_space:
                log.warning("journal %s: cannot keep %d bytes of room past its last page (%s): the "
                            "state filesystem is full; only writes that free space are taken now",
                            self.path, self._reserve, e.strerror)
            self.low_space = True
            return
        finally:
            os.close(fd)
        if self.low_space:
            log.info("journal %s: room kept again (%d bytes past its last page)", self.path,
                     self._file_size - used)
        self.low_space = False

    def transact(self, fn, essential=True):
        """Call fn(WriteTxn) in one write transaction and return its result.

        On a full map the transaction is aborted, the map doubled and fn
        called again from scratch. A write that is not *essential* (it neither frees space nor
        finishes what the journal has started) is refused with JournalFull while the journal's
        room is low on a full filesystem.
        """
        if self.readonly:
            raise JournalError(f"journal at {self.path} is open readonly")
        free = self._free_bytes() if not essential and self.low_space else None
        if free is not None and free < 2 * self._reserve:  # (once there is room, the next write keeps it)
            raise JournalFull(f"the state filesystem of the journal {self.path} is full "
                              f"({free // 1024} KiB free); the room left in the journal is "
                              "kept for rollbacks; nothing was written")
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

    def gone_layers(self):
        """{layer id: why} of every layer the journal positively says has left the stack: the
        layer of a step compensated or committed, the layers of the last drop
        (``meta/dropped_layers``), a layer reserved but never pushed (``meta/pending_layer``).
        Only these may be deleted; a layer directory the journal does not know is kept."""
        def scan(txn):
            out = {}
            for _key, raw in txn.cursor(db=self._dbs["steps"]):
                rec = _load(raw)
                if rec.get("layer") and rec.get("state") in ("compensated", "committed"):
                    out[rec["layer"]] = f"its step was {rec['state']}"
            for lid in _read_meta(txn, self._dbs, "dropped_layers", None) or ():
                out[lid] = "it was dropped"
            pending = _read_meta(txn, self._dbs, "pending_layer", None)
            if pending:
                out[pending] = "it was never pushed"
            return out
        return self._read(scan)

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
        environment is reopened. Returns (bytes before, bytes after): the pages in use (the
        room kept past them, see keep_reserve, is not counted). Holds the writer lock
        and the gate throughout: no transaction of this process runs meanwhile.
        """
        import shutil

        if self.readonly:
            raise JournalError("cannot compact a journal opened readonly")
        data = self.path / "data.mdb"
        tmp = self.path.parent / "journal.compact"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            with self._write_lock, self._gate.exclusive():
                env = self._live_env()
                before = (env.info()["last_pgno"] + 1) * self._psize
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
                self._file_size = 0
                self.keep_reserve()
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
