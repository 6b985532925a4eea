"""Durable LMDB journal: sagas, their steps, an event log and metadata."""

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import lmdb

from .check import check_file, probe
from .errors import JournalDamaged, JournalError, JournalFull, SchemaError
from .records import (DB_NAMES, OPTIONAL_DBS, SCHEMA_VERSION, _U64, _dump, _event_rec, _load, _read_meta, _read_saga,
                      _read_step_bases, _read_step_paths, _read_steps, _saga_rec, _upgrade_1_to_2)
from .txn import WriteTxn

log = logging.getLogger(__name__)

MAX_MAP_SIZE = 1 << 40  # stop doubling at 1 TiB

# Room kept ahead of the journal's last page: data.mdb is extended with fallocate so that the
# transactions that free space (a rollback, an abort, the end of a commit) find their pages
# already allocated on a full state filesystem. At most 1/64 of the filesystem, at least 64 KiB.
RESERVE = int(os.environ.get("OVERLAYD_JOURNAL_RESERVE", str(4 << 20)))


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
        """Sub-database handles; created in txn (read-write) or must exist (a read-only open
        leaves out an optional one that does not: OPTIONAL_DBS)."""
        try:
            dbs = {}
            for name in names:
                try:
                    dbs[name] = self._env.open_db(name.encode(), txn=txn, create=not self.readonly)
                except lmdb.NotFoundError:
                    if not (self.readonly and name in OPTIONAL_DBS):
                        raise
            return dbs
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

    def step_bases(self, saga_id):
        """{step index: {path: record}} of a saga's steps that kept base versions: the base's
        content when the step first changed a regular base file (``{"copy": sha256 or None,
        "why": ...}``, the file in STATE/basecopies/), and what ``saga resolve`` settled
        (``{"how", "rebase": base identity, "copy"}``)."""
        return self._read(lambda txn: _read_step_bases(txn, self._dbs, saga_id))

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
                    self._dbs = {name: self._env.open_db(name.encode(), txn=txn, create=True)
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
