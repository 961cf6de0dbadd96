"""The service never creates, truncates or re-permissions a file beside the gateway's database.

A reader of a WAL database shares the gateway's -wal and -shm files; SQLite creates them when
they are missing, even for a read-only connection, owned by whoever opens first. A service
running as another user would leave the gateway unable to write. These tests read as an
unprivileged user (nobody) from a directory that user may write, as the issue reproduced it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from support import Gateway

from usage_service.store import SchemaError, StoreMisconfigured, StoreUnavailable
from usage_service.store.sqlite import SQLiteStore

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged reader may write (as /var/lib/new-api often is)."""
    path = Path(tempfile.mkdtemp(prefix="usage-wal-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def listing(directory: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every file beside the database: (owner, mode, size, mtime)."""
    return {
        p.name: (st.st_uid, st.st_mode, st.st_size, st.st_mtime_ns) for p in directory.iterdir() for st in [p.stat()]
    }


def owners(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_uid for p in directory.iterdir()}


def reader(path: Path, conn: Connection) -> None:
    """In the unprivileged process: open the store, then answer the parent's commands."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    async def serve() -> None:
        try:
            store = await SQLiteStore.open(path, timeout=1.0, pool_size=2)
        except SchemaError as exc:
            conn.send(("refused", str(exc)))
            return
        conn.send(("open", ""))
        try:
            while (command := conn.recv()) != "close":
                try:
                    record = await store.fetch(command)
                    conn.send(("ok", None if record is None else record.used_quota))
                except StoreUnavailable as exc:
                    conn.send(("unavailable", str(exc)))
        finally:
            await store.close()
        conn.send(("closed", ""))

    asyncio.run(serve())


class Reader:
    """The store in a forked process running as nobody, driven over a pipe."""

    def __init__(self, path: Path) -> None:
        self.conn, child = multiprocessing.get_context("fork").Pipe()
        self.process = multiprocessing.get_context("fork").Process(target=reader, args=(path, child))
        self.process.start()
        self.opened = self._answer()

    def _answer(self) -> tuple[str, Any]:
        assert self.conn.poll(30), "the reader did not answer"
        answer: tuple[str, Any] = self.conn.recv()
        return answer

    def fetch(self, key: str) -> tuple[str, Any]:
        self.conn.send(key)
        return self._answer()

    def close(self) -> None:
        if self.opened[0] == "open":
            self.conn.send("close")
            assert self._answer()[0] == "closed"
        self.process.join(30)
        assert self.process.exitcode == 0


def gateway_database(directory: Path, journal_mode: str, used: int = 3) -> tuple[Path, str]:
    """A database the gateway wrote and then closed (it removes -wal and -shm on its way out)."""
    gateway = Gateway(directory / "one-api.db", journal_mode=journal_mode)
    token = gateway.add_token(used=used)
    gateway.close()
    return gateway.path, token.key


def reading(path: Path, body: Callable[[Reader], None]) -> None:
    store = Reader(path)
    try:
        body(store)
    finally:
        store.close()


def test_a_closed_wal_database_is_read_without_creating_anything(shared_dir: Path) -> None:
    path, key = gateway_database(shared_dir, "wal")
    assert sorted(os.listdir(shared_dir)) == ["one-api.db"]
    before = listing(shared_dir)

    def body(store: Reader) -> None:
        assert store.opened == ("open", "")
        assert store.fetch(key) == ("ok", 3)
        assert store.fetch("x" * 48) == ("ok", None)

    reading(path, body)
    assert listing(shared_dir) == before


def test_the_gateway_opening_the_database_takes_over_from_the_snapshot(shared_dir: Path) -> None:
    path, key = gateway_database(shared_dir, "wal")

    def body(store: Reader) -> None:
        assert store.fetch(key) == ("ok", 3)
        assert sorted(os.listdir(shared_dir)) == ["one-api.db"]
        gateway = Gateway(path, journal_mode="wal")  # the gateway starts: it creates -wal and -shm
        try:
            token = gateway.add_token()
            gateway.db.execute("UPDATE tokens SET used_quota = 7 WHERE `key` = ?", (key,))
            assert store.fetch(key) == ("ok", 7)
            assert store.fetch(token.key) == ("ok", 0)
        finally:
            gateway.close()
        assert store.fetch(key) == ("ok", 7)

    reading(path, body)
    # Every file there is the gateway's: none was created by the reader.
    assert set(owners(shared_dir).values()) == {os.geteuid()}


def test_a_connection_of_a_rollback_database_switched_to_wal_is_not_reused(shared_dir: Path) -> None:
    """A connection opened while the file used a rollback journal, still pooled when the file is
    switched to WAL mode by a process that then closes it (-wal and -shm removed): its next read
    would create both, owned by the reader. It is let go, and the file read as a snapshot."""
    path, key = gateway_database(shared_dir, "delete")
    store = Reader(path)
    try:
        assert store.fetch(key) == ("ok", 3)  # a connection opened in rollback mode, pooled
        db = sqlite3.connect(path, isolation_level=None)
        assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        db.execute("UPDATE tokens SET used_quota = 5 WHERE `key` = ?", (key,))
        db.close()
        assert store.fetch(key) == ("ok", 5)
        assert owners(shared_dir) == {"one-api.db": 0}
    finally:
        store.close()
    assert owners(shared_dir) == {"one-api.db": 0}


def _write_and_crash(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute("UPDATE tokens SET used_quota = 11")
    os._exit(0)  # killed: no clean close, -wal and -shm stay behind


async def test_the_files_a_crashed_gateway_left_are_read_as_they_are(shared_dir: Path) -> None:
    """A gateway killed with the database open leaves -wal and -shm, with nobody attached: the
    first process to open it would rebuild -shm, truncating it, and did, as any user that may
    write it (root here). The service opens -shm read-only whoever it runs as, and changes
    neither file; it reads the last commit."""
    gateway = Gateway(shared_dir / "one-api.db", journal_mode="wal")
    token = gateway.add_token(used=3)
    gateway.close()
    crash = multiprocessing.get_context("fork").Process(target=_write_and_crash, args=(gateway.path,))
    crash.start()
    crash.join(10)
    left = [shared_dir / "one-api.db-wal", shared_dir / "one-api.db-shm"]
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in left]
    store = await SQLiteStore.open(gateway.path, timeout=1.0, pool_size=1)
    try:
        record = await store.fetch(token.key)
        assert record is not None and record.used_quota == 11
    finally:
        await store.close()
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in left] == before


def test_a_wal_file_without_its_shm_is_refused_in_one_line(shared_dir: Path) -> None:
    """A copy taken while the gateway ran (database and -wal, no -shm) cannot be read as it is."""
    source = Path(tempfile.mkdtemp(prefix="usage-wal-src-"))
    try:
        gateway = Gateway(source / "one-api.db", journal_mode="wal")
        gateway.db.execute("PRAGMA wal_autocheckpoint = 0")
        gateway.add_token(used=3)
        for name in ("one-api.db", "one-api.db-wal"):
            shutil.copy(source / name, shared_dir / name)
        gateway.close()
    finally:
        shutil.rmtree(source)
    before = listing(shared_dir)

    store = Reader(shared_dir / "one-api.db")
    store.close()
    assert store.opened[0] == "refused"
    message = store.opened[1]
    assert "\n" not in message
    assert "one-api.db-shm" in message and "never" in message
    assert "unable to open database file" not in message
    assert listing(shared_dir) == before


def test_a_rollback_journal_database_reads_as_before(shared_dir: Path) -> None:
    path, key = gateway_database(shared_dir, "delete")

    def body(store: Reader) -> None:
        assert store.fetch(key) == ("ok", 3)
        gateway = Gateway(path)
        try:
            gateway.db.execute("UPDATE tokens SET used_quota = 9 WHERE `key` = ?", (key,))
        finally:
            gateway.close()
        assert store.fetch(key) == ("ok", 9)

    before = set(os.listdir(shared_dir))
    reading(path, body)
    assert set(os.listdir(shared_dir)) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read as another user")
def test_wal_files_the_reader_may_not_read_are_named_in_one_line(shared_dir: Path) -> None:
    """A gateway running with umask 077: its -wal and -shm are its own alone."""
    gateway = Gateway(shared_dir / "one-api.db", journal_mode="wal")
    try:
        gateway.add_token()
        for name in ("one-api.db-wal", "one-api.db-shm"):
            (shared_dir / name).chmod(0o600)
        before = listing(shared_dir)
        store = Reader(gateway.path)
        store.close()
        assert listing(shared_dir) == before
    finally:
        gateway.close()
    assert store.opened[0] == "refused"
    assert "\n" not in store.opened[1]
    assert "may not read one-api.db-wal and one-api.db-shm" in store.opened[1]


@pytest.mark.asyncio
async def test_a_wal_file_appearing_alone_makes_the_store_say_why(shared_dir: Path) -> None:
    """While running: the reason reaches /readyz (StoreMisconfigured), and nothing is created."""
    path, key = gateway_database(shared_dir, "wal")
    store = await SQLiteStore.open(path, timeout=1.0, pool_size=1)
    try:
        assert (await store.fetch(key)) is not None  # read as a snapshot
        (shared_dir / "one-api.db-wal").touch()  # what a half-finished copy leaves
        with pytest.raises(StoreMisconfigured) as unavailable:
            await store.ping()
        assert "one-api.db-wal exists without one-api.db-shm" in str(unavailable.value)
        assert sorted(os.listdir(shared_dir)) == ["one-api.db", "one-api.db-wal"]
        (shared_dir / "one-api.db-wal").unlink()
        await store.ping()
        assert (await store.fetch(key)) is not None
    finally:
        await store.close()


async def used_quota(store: SQLiteStore, key: str) -> int:
    record = await store.fetch(key)
    assert record is not None
    return record.used_quota


@pytest.mark.asyncio
async def test_a_symlinked_path_finds_the_wal_files_beside_the_file_it_names(shared_dir: Path) -> None:
    """SQLITE_PATH a symbolic link to the gateway's file: SQLite keeps -wal and -shm beside the
    file the link names, and the service opens that file. It looked for them beside the link,
    found none, took the running gateway's database for a closed one and read it immutable,
    without the commits still in -wal: here, not even the tables."""
    (shared_dir / "data").mkdir()
    gateway = Gateway(shared_dir / "data" / "one-api.db", journal_mode="wal")
    try:
        gateway.db.execute("PRAGMA wal_autocheckpoint = 0")  # the commits stay in -wal
        token = gateway.add_token(used=3)
        link = shared_dir / "one-api.db"
        link.symlink_to(gateway.path)
        store = await SQLiteStore.open(link, timeout=1.0, pool_size=1)
        try:
            assert await used_quota(store, token.key) == 3
            gateway.db.execute("UPDATE tokens SET used_quota = 8 WHERE `key` = ?", (token.key,))
            assert await used_quota(store, token.key) == 8
        finally:
            await store.close()
    finally:
        gateway.close()


@pytest.mark.asyncio
async def test_a_symbolic_link_pointed_at_another_file_is_followed(shared_dir: Path) -> None:
    """A restore that points SQLITE_PATH's link at a new file: the service reads the new file
    (it noticed the swap, but kept opening the old link target until a restart)."""
    old, new = Gateway(shared_dir / "old.db"), Gateway(shared_dir / "new.db")
    try:
        token = old.add_token(used=3)
        new.add_token(key=token.key, user_id=new.add_user(), used=9)
        link = shared_dir / "one-api.db"
        link.symlink_to(old.path)
        store = await SQLiteStore.open(link, timeout=1.0, pool_size=1)
        store.identity_check_interval = 0
        try:
            assert await used_quota(store, token.key) == 3
            (shared_dir / "next").symlink_to(new.path)
            os.replace(shared_dir / "next", link)  # the link swapped in one step
            assert await used_quota(store, token.key) == 9
        finally:
            await store.close()
    finally:
        old.close()
        new.close()
