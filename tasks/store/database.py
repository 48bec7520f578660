"""The database file: connections, the lock retry, transactions and schema migrations.

* A connection is opened per operation and closed at its end, so a paused flow (or an idle
  `alflow label`) holds no lock and another process can write.
* DuckDB lets one process hold a database file; another process meeting the lock retries
  with backoff for ``lock_timeout`` seconds, then fails with a message naming the holder.
* Writes that belong together run in one transaction; an error rolls all of them back.
  Within one process, write transactions on one file take turns (DuckDB would otherwise
  let two threads' transactions each miss what the other is writing).
* The schema is the numbered ``migrations/NNNN_*.sql`` files, applied in order, all in one
  transaction that also reads the current version, so two processes opening a new file at
  once cannot both migrate it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import duckdb

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd


class StoreError(RuntimeError):
    """A store operation could not be done; the message says which and why."""


class StoreLockedError(StoreError):
    """Another process held the database file for longer than the lock timeout."""


class StoreUnwritableError(StoreError):
    """The OS refuses to write the database: it is read-only, or its disk is full.
    Trying again at once fails the same way."""


# How the OS refuses a write, as DuckDB passes it on.
_READ_ONLY = ("Permission denied", "Operation not permitted", "Read-only file system")
_FULL = ("No space left on device", "Disk quota exceeded")


def unwritable(path: Path, exc: BaseException) -> StoreUnwritableError | None:
    """A one-line error naming the database and why it cannot be written; None for any
    other error."""
    text = str(exc)
    cause = text.splitlines()[0] if text else type(exc).__name__
    if any(words in text for words in _FULL):
        return StoreUnwritableError(f"database {path}: the disk is full ({cause}); nothing of this write was "
                                    "stored: free some space and run again")
    if any(words in text for words in _READ_ONLY):
        return StoreUnwritableError(f"database {path} is read-only ({cause}); make the file and its folder "
                                    "writable, or set database to another path")
    return None


def utcnow() -> datetime:
    """Naive UTC timestamp: every time column in the store is UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _migration_files() -> list[str]:
    """The SQL of each migration, in order: element N-1 takes the schema from v(N-1) to vN."""
    folder = resources.files(__package__) / "migrations"
    names = sorted(p.name for p in folder.iterdir() if re.fullmatch(r"\d{4}_\w+\.sql", p.name))
    for number, name in enumerate(names, start=1):
        if int(name[:4]) != number:
            raise RuntimeError(f"migration {name} is out of sequence (expected {number:04d}_...)")
    return [(folder / name).read_text(encoding="utf-8") for name in names]


MIGRATIONS: list[str] = _migration_files()
SCHEMA_VERSION = len(MIGRATIONS)

# DuckDB shares one database instance between a process's connections to a file; a thread
# connecting while another is still setting that instance up can find its functions
# missing ("pandas_scan does not exist" on register), so connections are opened one at a time.
_open_lock = threading.Lock()

_write_locks: dict[str, threading.RLock] = {}
_write_locks_guard = threading.Lock()


def _write_lock(path: Path) -> threading.RLock:
    key = str(path.resolve())
    with _write_locks_guard:
        return _write_locks.setdefault(key, threading.RLock())


def _holder(message: str) -> str:
    match = re.search(r"held in (.+?) \(PID (\d+)\)", message)
    return f"PID {match.group(2)} ({match.group(1)})" if match else "another process"


class Database:
    """The DuckDB file at ``path``. Cheap to create; holds no connection between calls.

    Parameters
    ----------
    path : str or Path
        The DuckDB file; its folder is created if missing.
    lock_timeout : float
        Seconds to keep retrying while another process holds the file.
    """

    def __init__(self, path: str | Path, lock_timeout: float = 30.0):
        self.path = Path(path)
        self.lock_timeout = float(lock_timeout)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one operation, closed on exit (the file lock goes with it)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise unwritable(self.path, exc) or StoreError(f"{self.path}: cannot create its folder: {exc}") from exc
        if not self.path.exists():
            self._create()
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                with _open_lock:
                    con = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise unwritable(self.path, exc) or StoreError(f"{self.path}: cannot open database: {exc}") \
                        from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreLockedError(
                        f"{self.path} is locked by {_holder(str(exc))} for more than "
                        f"{self.lock_timeout:g} s; stop that process or raise "
                        "store.lock_timeout_seconds"
                    ) from None
                # Never sleep past the deadline, and try once more at it.
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
        try:
            yield con
        except duckdb.Error as exc:  # a write the OS refused (in a statement, or at commit): one line
            error = unwritable(self.path, exc)
            if error is None:
                raise
            raise error from exc
        finally:
            con.close()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Keep the database open for the block. DuckDB shares one open database between a
        process's connections to a file, so each operation's connection then costs about
        a millisecond, and the checkpoint DuckDB runs when the last one closes happens once,
        at the end: for a run of writes done as fast as they go (a large file's chunks).
        Other processes stay locked out until the block ends: nothing in it may wait on a
        service or a person."""
        with self.connect():
            yield

    def _create(self) -> None:
        """Create the file whole: an empty database written aside, then hard-linked into
        place, which never replaces a file another process created meanwhile. A process
        opening the path can then never meet a file half written (DuckDB refuses one as
        "not a valid DuckDB database file", not as locked)."""
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.new")
        try:
            duckdb.connect(str(aside)).close()
            os.link(aside, self.path)
        except FileExistsError:
            pass  # another process created it first
        except (OSError, duckdb.Error):
            pass  # no hard links here (or no room aside): DuckDB creates it on connect
        finally:
            aside.unlink(missing_ok=True)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One connection, one transaction: committed on success, rolled back on any error."""
        with _write_lock(self.path), self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def query_df(self, sql: str, params: Sequence | dict | None = None) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute(sql, params or []).df()

    def scalar(self, sql: str, params: Sequence | dict | None = None):
        with self.connect() as con:
            row = con.execute(sql, params or []).fetchone()
        return row[0] if row else None

    # -- schema ------------------------------------------------------------------------
    def schema_version(self, con: duckdb.DuckDBPyConnection) -> int:
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        ).fetchone()[0]
        if not exists:
            return 0
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]

    def migrate(self) -> int:
        """Bring the schema to this code's version. Returns it.

        The version is read and every missing step applied in one transaction: the file
        lock keeps other processes out for its length, so the first to arrive migrates
        and the others find the schema current.
        """
        with self.transaction() as con:
            current = self.schema_version(con)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema v{current}, newer than this alflow (v{SCHEMA_VERSION}); "
                    "upgrade alflow"
                )
            if current < SCHEMA_VERSION:
                con.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version "
                    "(version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                con.execute(MIGRATIONS[version - 1])
                con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, utcnow()])
        return SCHEMA_VERSION
