"""The Python client's context managers against a real daemon (see also test_cli.py)."""

import pytest

from conftest import put, read
from overlayd.client import ClientError, ConflictError, Workspace


@pytest.fixture
def shared(mount_factory, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    put(base / "shared", "0\n")
    m = mount_factory(base, name="client-conflict")
    return m, Workspace(socket_path=m.socket)


def edit_then_conflict(m, ws, **kwargs):
    """A saga block that changes 'shared' while the base's 'shared' changes underneath (as
    another workspace's commit does): its commit on exit is refused."""
    with pytest.raises(ConflictError) as ei:
        with ws.saga("edit", **kwargs) as s:
            with s.step("one"):
                put(m.mp / "shared", "mine\n")
            put(m.base / "shared", "theirs\n")
    err = ei.value
    assert err.saga is s and [c["path"] for c in err.conflicts] == ["shared"]
    return err


def test_saga_block_keeps_the_saga_on_a_conflict(shared):
    m, ws = shared
    err = edit_then_conflict(m, ws)
    assert not err.aborted
    assert "still active" in str(err) and "err.saga.rollback" in str(err)
    status = ws.status()
    assert status["saga"]["name"] == "edit" and status["saga"]["state"] == "active"
    assert read(m.mp / "shared") == b"mine\n"  # nothing was lost
    with pytest.raises(ClientError) as ei:
        with ws.saga("next"):
            pass
    assert ei.value.code == "saga-active"
    # resolve: drop the step that changed the path, redo the change over the base's new version
    err.saga.rollback(to=0)
    assert read(m.mp / "shared") == b"theirs\n"
    with err.saga.step("redo"):
        put(m.mp / "shared", read(m.mp / "shared") + b"mine\n")
    err.saga.commit()
    assert read(m.base / "shared") == b"theirs\nmine\n"
    assert ws.status()["saga"] is None


def test_saga_block_can_abort_on_a_conflict(shared):
    m, ws = shared
    with pytest.raises(ValueError):
        ws.saga("bad", on_conflict="retry")
    err = edit_then_conflict(m, ws, on_conflict="abort")
    assert err.aborted and "aborted" in str(err)
    assert ws.status()["saga"] is None
    assert read(m.base / "shared") == b"theirs\n" and read(m.mp / "shared") == b"theirs\n"
    with ws.saga("next") as s:
        with s.step("two"):
            put(m.mp / "other", "2\n")
    assert read(m.base / "other") == b"2\n"
