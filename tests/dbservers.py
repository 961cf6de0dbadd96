"""Real PostgreSQL and MariaDB servers for the tests, in temporary directories on loopback ports.

scripts/test installs Debian's `postgresql` and `mariadb-server` when they are missing; no
service of theirs runs: each session starts its own servers and removes them at the end.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from support import Gateway, Token, free_port

START_TIMEOUT = 60.0


def _find(binary: str, patterns: tuple[str, ...]) -> str:
    found = shutil.which(binary)
    if found:
        return found
    # Debian keeps the PostgreSQL server's programs out of PATH, under a versioned directory.
    candidates = sorted((p for pattern in patterns for p in glob.glob(pattern)), key=_version_key)
    if not candidates:
        raise RuntimeError(f"{binary} is not installed; run scripts/test, which installs it")
    return candidates[-1]


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in Path(path).parts if part.isdigit())


class _Server:
    """A database server process we started, its temporary directory and its log."""

    name = "server"

    def __init__(self, options: Sequence[str] = ()) -> None:
        # Server settings beside the tests' own (PostgreSQL's "name=value", MariaDB's "--name=value"):
        # the benchmarks size the caches as a gateway's database server would be.
        self.options = list(options)
        self.port = free_port()
        # Not under pytest's tmp_path: that is private to root, and PostgreSQL runs as another user.
        self.dir = Path(tempfile.mkdtemp(prefix=f"usage-{self.name}-"))
        self.dir.chmod(0o755)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "server.log"

    def _spawn(self, args: list[str], user: str | None) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                start_new_session=True,
            )

    def _wait(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.1)
        output = self.log.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{output}")

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer(_Server):
    """PostgreSQL as the `postgres` user when we are root (it refuses to run as root)."""

    name = "postgres"
    superuser, superuser_password = "postgres", "gateway-pw"

    def start(self) -> None:
        initdb = _find("initdb", ("/usr/lib/postgresql/*/bin/initdb",))
        postgres = str(Path(initdb).with_name("postgres"))
        user = "postgres" if os.geteuid() == 0 else None
        data = self.dir / "data"
        data.mkdir()
        if user is not None:
            shutil.chown(self.dir, user, user)
            shutil.chown(data, user, user)
        # Passwords over TCP, as a real server asks for them.
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if user is not None:
            shutil.chown(pwfile, user, user)
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        subprocess.run(
            [initdb, "-D", str(data), "-U", self.superuser, *auth, "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
        settings = ["listen_addresses=127.0.0.1", "unix_socket_directories=", "fsync=off", "full_page_writes=off"]
        args = [postgres, "-D", str(data), "-p", str(self.port)]
        for setting in [*settings, *self.options]:
            args += ["-c", setting]
        self._spawn(args, user)
        self._wait(self._ready)

    def _ready(self) -> bool:
        import psycopg

        with psycopg.connect(self.url("postgres"), connect_timeout=2):
            return True

    def url(self, database: str, user: str | None = None, password: str | None = None) -> str:
        credentials = user or self.superuser
        password = password if user else self.superuser_password
        if password:
            credentials += f":{password}"
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{database}"


class MariaDBServer(_Server):
    """MariaDB with its own datadir, socket and port; as root it runs with --user=root."""

    name = "mariadb"

    def start(self) -> None:
        mariadbd = _find("mariadbd", ("/usr/sbin/mariadbd",))
        install_db = _find("mariadb-install-db", ("/usr/bin/mariadb-install-db",))
        data = self.dir / "data"
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            [
                install_db,
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *user,
            ],
            check=True,
            capture_output=True,
        )
        args = [
            mariadbd,
            "--no-defaults",
            f"--datadir={data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket}",
            f"--pid-file={self.dir / 'mariadb.pid'}",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
            "--innodb-flush-log-at-trx-commit=0",
            "--skip-log-bin",
            *self.options,  # later options override earlier ones
            *user,
        ]
        self._spawn(args, None)
        self._wait(self._ready)

    @property
    def socket(self) -> Path:
        return self.dir / "mariadb.sock"

    def _ready(self) -> bool:
        # The server greets first; a greeting means it accepts connections.
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            return len(conn.recv(64)) > 4 and self.socket.exists()


# --- the gateway's tables on each engine ------------------------------------------------------
# As new-api's gorm AutoMigrate creates them (model/token.go, model/user.go): Go int is bigint,
# bool is boolean (tinyint(1) on MySQL), a string without a size is text on PostgreSQL and
# varchar(191) on MySQL when indexed or defaulted, longtext otherwise; DeletedAt is a timestamp.

POSTGRES_SCHEMA = """
CREATE TABLE tokens (
  id bigserial PRIMARY KEY, user_id bigint, "key" varchar(128), status bigint DEFAULT 1, name text,
  created_time bigint, accessed_time bigint, expired_time bigint DEFAULT -1, remain_quota bigint DEFAULT 0,
  unlimited_quota boolean, model_limits_enabled boolean, model_limits text, allow_ips text DEFAULT '',
  used_quota bigint DEFAULT 0, "group" text DEFAULT '', cross_group_retry boolean, billing_type bigint DEFAULT 0,
  deleted_at timestamptz
);
CREATE UNIQUE INDEX idx_tokens_key ON tokens ("key");
CREATE INDEX idx_tokens_user_id ON tokens (user_id);
CREATE INDEX idx_tokens_deleted_at ON tokens (deleted_at);
CREATE TABLE users (
  id bigserial PRIMARY KEY, username text UNIQUE, password text NOT NULL, display_name text, role int DEFAULT 1,
  status int DEFAULT 1, email text, access_token char(32), quota bigint DEFAULT 0, used_quota bigint DEFAULT 0,
  request_count int DEFAULT 0, "group" varchar(64) DEFAULT 'default', aff_code varchar(32), inviter_id int,
  setting text, deleted_at timestamptz
);
CREATE INDEX idx_users_deleted_at ON users (deleted_at);
CREATE TABLE options ("key" text PRIMARY KEY, "value" text);
"""

# The request log (model/log.go), with the gateway's indexes.
POSTGRES_LOGS_SCHEMA = """
CREATE TABLE logs (
  id bigserial PRIMARY KEY, user_id bigint, created_at bigint, type bigint, content text,
  username text DEFAULT '', token_name text DEFAULT '', model_name text DEFAULT '', quota bigint DEFAULT 0,
  prompt_tokens bigint DEFAULT 0, completion_tokens bigint DEFAULT 0, use_time bigint DEFAULT 0,
  is_stream boolean, channel_id bigint, token_id bigint DEFAULT 0, "group" text, ip text DEFAULT '', other text
);
CREATE INDEX idx_created_at_id ON logs (id, created_at);
CREATE INDEX idx_logs_user_id ON logs (user_id);
CREATE INDEX idx_created_at_type ON logs (created_at, type);
CREATE INDEX idx_logs_username ON logs (username);
CREATE INDEX index_username_model_name ON logs (model_name, username);
CREATE INDEX idx_logs_token_name ON logs (token_name);
CREATE INDEX idx_logs_model_name ON logs (model_name);
CREATE INDEX idx_logs_channel_id ON logs (channel_id);
CREATE INDEX idx_logs_token_id ON logs (token_id);
CREATE INDEX idx_logs_group ON logs ("group");
CREATE INDEX idx_logs_ip ON logs (ip);
"""
POSTGRES_SCHEMA += POSTGRES_LOGS_SCHEMA

MYSQL_SCHEMA = """
CREATE TABLE `tokens` (
  `id` bigint AUTO_INCREMENT, `user_id` bigint, `key` varchar(128), `status` bigint DEFAULT 1,
  `name` varchar(191), `created_time` bigint, `accessed_time` bigint, `expired_time` bigint DEFAULT -1,
  `remain_quota` bigint DEFAULT 0, `unlimited_quota` boolean, `model_limits_enabled` boolean,
  `model_limits` text, `allow_ips` varchar(191) DEFAULT '', `used_quota` bigint DEFAULT 0,
  `group` varchar(191) DEFAULT '', `cross_group_retry` boolean, `billing_type` bigint DEFAULT 0,
  `deleted_at` datetime(3) NULL,
  PRIMARY KEY (`id`), UNIQUE INDEX `idx_tokens_key` (`key`), INDEX `idx_tokens_user_id` (`user_id`),
  INDEX `idx_tokens_deleted_at` (`deleted_at`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE `users` (
  `id` bigint AUTO_INCREMENT, `username` varchar(191) UNIQUE, `password` longtext NOT NULL,
  `display_name` varchar(191), `role` int DEFAULT 1, `status` int DEFAULT 1, `email` varchar(191),
  `access_token` char(32), `quota` bigint DEFAULT 0, `used_quota` bigint DEFAULT 0, `request_count` int DEFAULT 0,
  `group` varchar(64) DEFAULT 'default', `aff_code` varchar(32), `inviter_id` int, `setting` text,
  `deleted_at` datetime(3) NULL,
  PRIMARY KEY (`id`), INDEX `idx_users_deleted_at` (`deleted_at`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE `options` (
  `key` varchar(191), `value` longtext, PRIMARY KEY (`key`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
"""

MYSQL_LOGS_SCHEMA = """
CREATE TABLE `logs` (
  `id` bigint AUTO_INCREMENT, `user_id` bigint, `created_at` bigint, `type` bigint, `content` longtext,
  `username` varchar(191) DEFAULT '', `token_name` varchar(191) DEFAULT '', `model_name` varchar(191) DEFAULT '',
  `quota` bigint DEFAULT 0, `prompt_tokens` bigint DEFAULT 0, `completion_tokens` bigint DEFAULT 0,
  `use_time` bigint DEFAULT 0, `is_stream` boolean, `channel_id` bigint, `token_id` bigint DEFAULT 0,
  `group` varchar(191), `ip` varchar(191) DEFAULT '', `other` longtext,
  PRIMARY KEY (`id`), INDEX `idx_created_at_id` (`id`, `created_at`), INDEX `idx_logs_user_id` (`user_id`),
  INDEX `idx_created_at_type` (`created_at`, `type`), INDEX `idx_logs_username` (`username`),
  INDEX `index_username_model_name` (`model_name`, `username`), INDEX `idx_logs_token_name` (`token_name`),
  INDEX `idx_logs_model_name` (`model_name`), INDEX `idx_logs_channel_id` (`channel_id`),
  INDEX `idx_logs_token_id` (`token_id`), INDEX `idx_logs_group` (`group`), INDEX `idx_logs_ip` (`ip`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
"""
MYSQL_SCHEMA += MYSQL_LOGS_SCHEMA

# one-api era: the key as char(48), no model-limit columns.
POSTGRES_OLD_SCHEMA = """
CREATE TABLE tokens (
  id bigserial PRIMARY KEY, user_id bigint, "key" char(48), status bigint DEFAULT 1, name text,
  created_time bigint, accessed_time bigint, expired_time bigint DEFAULT -1, remain_quota bigint DEFAULT 0,
  unlimited_quota boolean, used_quota bigint DEFAULT 0, deleted_at timestamptz
);
CREATE UNIQUE INDEX idx_tokens_key ON tokens ("key");
CREATE TABLE users (
  id bigserial PRIMARY KEY, username text UNIQUE, password text NOT NULL, status int DEFAULT 1,
  quota bigint DEFAULT 0, deleted_at timestamptz
);
CREATE TABLE options ("key" text PRIMARY KEY, "value" text);
"""
# Gateways of that era had their request log too (the read-only grants name it).
POSTGRES_OLD_SCHEMA += POSTGRES_LOGS_SCHEMA

MYSQL_OLD_SCHEMA = """
CREATE TABLE `tokens` (
  `id` bigint AUTO_INCREMENT PRIMARY KEY, `user_id` bigint, `key` char(48) UNIQUE, `status` bigint DEFAULT 1,
  `name` varchar(191), `created_time` bigint, `accessed_time` bigint, `expired_time` bigint DEFAULT -1,
  `remain_quota` bigint DEFAULT 0, `unlimited_quota` boolean, `used_quota` bigint DEFAULT 0,
  `deleted_at` datetime(3) NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE `users` (
  `id` bigint AUTO_INCREMENT PRIMARY KEY, `username` varchar(191) UNIQUE, `password` longtext NOT NULL,
  `status` int DEFAULT 1, `quota` bigint DEFAULT 0, `deleted_at` datetime(3) NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE `options` (`key` varchar(191) PRIMARY KEY, `value` longtext) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
"""
MYSQL_OLD_SCHEMA += MYSQL_LOGS_SCHEMA

# The read-only user the service connects as, granted exactly what docs/databases.md tells operators.
READER, READER_PASSWORD = "usage_service", "r3ad-only:p@ss"
DATABASES_DOC = Path(__file__).parent.parent / "docs" / "databases.md"


def documented_grants(engine_heading: str, database: str, gateway_user: str = "") -> list[str]:
    """docs/databases.md's statements for a read-only user, for this database: the tests run as that user."""
    section = DATABASES_DOC.read_text().split(f"\n## {engine_heading}\n", 1)[1].split("\n## ", 1)[0]
    sql = section.split("```sql\n", 1)[1].split("```", 1)[0]
    sql = sql.replace("CHANGE-ME", READER_PASSWORD).replace("new-api", database)
    sql = sql.replace("GATEWAY-USER", gateway_user)
    return [statement.strip() for statement in sql.split(";") if statement.strip()]


class PostgresGateway(Gateway):
    """Writes a gateway database on the session's PostgreSQL server, as the gateway's own user."""

    BOOLEANS = ("unlimited_quota", "model_limits_enabled")

    def __init__(
        self, server: PostgresServer, database: str, *, schema: str = POSTGRES_SCHEMA, encoding: str = "UTF8"
    ) -> None:
        """`encoding`: the database's; SQL_ASCII keeps whatever bytes the gateway writes."""
        import psycopg

        from usage_service._dsn import parse_sql_dsn

        self.server, self.name = server, database
        self.path = server.dir / database  # not a file: what SQLITE_PATH would be, unused
        with psycopg.connect(server.url("postgres"), autocommit=True) as admin:
            exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
            if not exists:
                locale = " LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0" if encoding != "UTF8" else ""
                admin.execute(f"CREATE DATABASE \"{database}\" ENCODING '{encoding}'{locale}")  # type: ignore[arg-type]
            role = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER,)).fetchone()
        self.conn = psycopg.connect(server.url(database), autocommit=True)
        try:
            if not exists:
                self.conn.execute(schema)  # type: ignore[arg-type]
                if schema == POSTGRES_LOGS_SCHEMA:  # a log database of its own (LOG_SQL_DSN)
                    grants = [f'GRANT CONNECT ON DATABASE "{database}" TO {READER}']
                    grants.append(f"GRANT USAGE ON SCHEMA public TO {READER}")
                    if not role:
                        grants[:0] = [
                            f"CREATE ROLE {READER} LOGIN PASSWORD '{READER_PASSWORD}'",
                            f"ALTER ROLE {READER} SET default_transaction_read_only = on",
                        ]
                else:
                    grants = documented_grants("PostgreSQL", database, server.superuser)
                for statement in grants:
                    if not (role and statement.startswith("CREATE ROLE")):  # one role for the cluster
                        self.conn.execute(statement)  # type: ignore[arg-type]
                if "CREATE TABLE logs" in schema:
                    self.conn.execute(f"GRANT SELECT ON logs TO {READER}")  # type: ignore[arg-type]
                # The tests' tables hold a few rows: an autovacuum that analyses one mid-test
                # would make the planner prefer a scan of it, at a moment nobody chose, and the
                # tests that read query plans would pass or fail by timing. Plans are read
                # without statistics (the benches ANALYZE theirs).
                for table in self._tables():
                    self.conn.execute(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')  # type: ignore[arg-type]
            # A fresh gateway per test, on tables made once per session.
            tables = self._tables()
            self.conn.execute(f"TRUNCATE {', '.join(sorted(tables))} RESTART IDENTITY")  # type: ignore[arg-type]
        except BaseException:
            self.conn.close()
            raise
        self.dsn = server.url(database, READER, _url_quote(READER_PASSWORD))  # SQL_DSN, as the gateway has it
        self.database = parse_sql_dsn(self.dsn)
        self.owner_database = parse_sql_dsn(server.url(database))  # the gateway's own, all-powerful user

    def _tables(self) -> list[str]:
        # (psycopg reads a SQL_ASCII database's text as bytes.)
        rows = self.conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return [name.decode() if isinstance(name, bytes) else name for (name,) in rows]

    def drop_reader_sessions(self) -> int:
        """Close the service's sessions from the server side, as a restart or failover would."""
        rows = self.conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (READER,)
        ).fetchall()
        return len(rows)

    def reader_sessions(self, *, busy: bool = False) -> int:
        """The service's sessions on this database, as the server lists them (with `busy`, those
        running a statement)."""
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s"
            + (" AND state = 'active'" if busy else ""),
            (READER, self.name),
        ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.conn.close()

    def _execute(self, sql: str, params: Sequence[object]) -> int:
        sql = sql.replace("?", "%s").replace("`", '"')
        if sql.startswith("INSERT"):
            row = self.conn.execute(sql + " RETURNING id", params).fetchone()  # type: ignore[arg-type]
            return int(row[0]) if row else 0
        self.conn.execute(sql, params)  # type: ignore[arg-type]
        return 0

    def add_token(self, *, unlimited: object = 0, model_limits_enabled: object = 0, **columns: Any) -> Token:
        # The gateway's booleans are boolean columns here; 0/1 from the tests become False/True.
        return super().add_token(
            unlimited=_boolean(unlimited), model_limits_enabled=_boolean(model_limits_enabled), **columns
        )

    def add_log(self, token: Token | None, *, is_stream: object = 0, **columns: Any) -> int:
        return super().add_log(token, is_stream=_boolean(is_stream), **columns)

    def update_token(self, token: Token, **columns: object) -> None:
        for name in self.BOOLEANS:
            if name in columns:
                columns[name] = _boolean(columns[name])
        super().update_token(token, **columns)

    def set_option(self, key: str, value: str | None) -> None:
        if value is None:
            self.conn.execute('DELETE FROM options WHERE "key" = %s', (key,))
        else:
            self.conn.execute(
                'INSERT INTO options ("key", "value") VALUES (%s, %s) ON CONFLICT ("key") DO UPDATE SET "value" = %s',
                (key, value, value),
            )

    @contextlib.contextmanager
    def exclusive_lock(self, table: str = "tokens") -> Iterator[None]:
        """Hold a table locked against readers, as a gateway migration would."""
        import psycopg

        with psycopg.connect(self.server.url(self.name)) as lock:
            lock.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")  # type: ignore[arg-type]
            try:
                yield
            finally:
                lock.rollback()


class MySQLGateway(Gateway):
    """Writes a gateway database on the session's MariaDB server, as the gateway's own user."""

    def __init__(self, server: MariaDBServer, database: str, *, schema: str = MYSQL_SCHEMA) -> None:
        import pymysql

        from usage_service._dsn import parse_sql_dsn

        self.server, self.name = server, database
        self.path = server.dir / database  # not a file: what SQLITE_PATH would be, unused
        self.conn = pymysql.connect(unix_socket=str(server.socket), user="root", autocommit=True)
        try:
            with self.conn.cursor() as cursor:
                exists = cursor.execute("SHOW DATABASES LIKE %s", (database,))
                if not exists:
                    cursor.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
                cursor.execute(f"USE `{database}`")
                if not exists:
                    for statement in filter(str.strip, schema.split(";")):
                        cursor.execute(statement)
                    grants = documented_grants("MySQL and MariaDB", database)
                    if schema == MYSQL_LOGS_SCHEMA:  # a log database of its own (LOG_SQL_DSN)
                        grants = [grants[0]]  # the user, granted only the log below
                    for statement in grants:
                        # One user for the server, however many databases.
                        cursor.execute(statement.replace("CREATE USER ", "CREATE USER IF NOT EXISTS ", 1))
                    if "CREATE TABLE `logs`" in schema:
                        cursor.execute(f"GRANT SELECT ON `{database}`.`logs` TO '{READER}'@'%'")
                # A fresh gateway per test, on tables made once per session.
                cursor.execute("SHOW TABLES")
                for (table,) in cursor.fetchall():
                    cursor.execute(f"DELETE FROM `{table}`")
        except BaseException:
            self.conn.close()
            raise
        # The gateway's own form of DSN, as an operator would copy it from the gateway's settings.
        address, params = f"tcp(127.0.0.1:{server.port})", "charset=utf8mb4&parseTime=True&loc=Local"
        self.dsn = f"{READER}:{READER_PASSWORD}@{address}/{database}?{params}"
        self.database = parse_sql_dsn(self.dsn)
        self.owner_database = parse_sql_dsn(f"root@tcp(127.0.0.1:{server.port})/{database}")

    def drop_reader_sessions(self) -> int:
        """Close the service's sessions from the server side, as a restart or failover would."""
        with self.conn.cursor() as cursor:
            cursor.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (READER,))
            ids = [row[0] for row in cursor.fetchall()]
            for session in ids:
                cursor.execute(f"KILL {int(session)}")
        return len(ids)

    def reader_sessions(self, *, busy: bool = False) -> int:
        """The service's sessions on this database, as the server lists them (with `busy`, those
        running a statement)."""
        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM information_schema.PROCESSLIST WHERE USER = %s AND DB = %s"
                + (" AND COMMAND = 'Query'" if busy else ""),
                (READER, self.name),
            )
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.conn.close()

    def _execute(self, sql: str, params: Sequence[object]) -> int:
        with self.conn.cursor() as cursor:
            cursor.execute(sql.replace("?", "%s"), tuple(params) or None)
            return int(cursor.lastrowid or 0)

    def set_option(self, key: str, value: str | None) -> None:
        if value is None:
            self._execute("DELETE FROM options WHERE `key` = ?", (key,))
        else:
            self._execute("REPLACE INTO options (`key`, `value`) VALUES (?, ?)", (key, value))

    @contextlib.contextmanager
    def exclusive_lock(self) -> Iterator[None]:
        """Hold the tokens table locked against readers, as a gateway migration would."""
        import pymysql

        lock = pymysql.connect(unix_socket=str(self.server.socket), user="root", database=self.name)
        try:
            with lock.cursor() as cursor:
                cursor.execute("LOCK TABLES tokens WRITE, users WRITE")
                yield
                cursor.execute("UNLOCK TABLES")
        finally:
            lock.close()


def _url_quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _boolean(value: object) -> object:
    return bool(value) if isinstance(value, int | float) else value
