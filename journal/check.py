"""Checking a data.mdb before LMDB maps it (check_file) and reading all of it in a child
process (probe): a damaged journal is a refusal to start, never a SIGBUS or a fresh journal."""

import errno
import os
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import lmdb

from .errors import JournalDamaged, JournalError

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

