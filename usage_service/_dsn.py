"""The gateway's SQL_DSN, read with the gateway's own conventions.

Empty or starting with 'local': SQLite (SQLITE_PATH). 'postgres://' or 'postgresql://': a
PostgreSQL URL. Anything else: a DSN in the form of Go's MySQL driver (go-sql-driver/mysql),
`[user[:password]@][protocol[(address)]]/dbname[?param=value&...]`, parsed the way that driver
parses it, so a DSN the gateway accepts is accepted here and one it rejects is rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

MYSQL_PORT = 3306


@dataclass(frozen=True)
class PostgresDSN:
    # The URL goes to asyncpg as written (it reads sslmode and the like), but for the user name
    # and password, percent-encoded, and pgx's own parameters, left out; it may carry a password,
    # so it stays out of repr.
    url: str = field(repr=False)
    host: str = ""
    database: str = ""

    def describe(self) -> str:
        """Where the database is, without credentials, for logs and errors."""
        return f"PostgreSQL database {self.database or '(default)'!r} on {self.host or 'the local socket'}"


@dataclass(frozen=True)
class MySQLDSN:
    user: str = ""
    password: str = field(default="", repr=False)
    host: str = "127.0.0.1"
    port: int = MYSQL_PORT
    unix_socket: str | None = None
    database: str = ""
    charset: str = "utf8mb4"
    connect_timeout: float | None = None
    tls: str = "false"  # "false", "true" (verified), "skip-verify" or "preferred" (not verified)

    def describe(self) -> str:
        where = self.unix_socket if self.unix_socket else f"{self.host}:{self.port}"
        return f"MySQL database {self.database!r} on {where}"


def parse_sql_dsn(value: str) -> PostgresDSN | MySQLDSN | None:
    """Return the database SQL_DSN names, or None for SQLite; raise ValueError on a malformed one."""
    value = value.strip()
    if not value or value.startswith("local"):
        return None
    if value.startswith(("postgres://", "postgresql://")):
        return _postgres(value)
    return parse_mysql_dsn(value)


# Parameters the gateway's driver (pgx) reads itself. asyncpg sends any parameter it does not
# know to the server as a setting, which the server refuses: they are left out of its URL (the
# service's own timeouts and statements apply).
_PGX_ONLY = frozenset(
    {
        "connect_timeout",
        "sslsni",
        "krbspn",
        "statement_cache_capacity",
        "description_cache_capacity",
        "default_query_exec_mode",
    }
)
_BAD_PORT = (
    "malformed PostgreSQL URL: its port is not a number (percent-encode '/', '?', '#' and '@'"
    " in the user name and password)"
)


_BAD_ESCAPE = re.compile("%(?![0-9A-Fa-f]{2})")


def _postgres(value: str) -> PostgresDSN:
    # (Not the parser's messages: they quote the URL up to where they failed, password included.)
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(_BAD_PORT) from None
    # Several hosts, for failover (host1:5432,host2:5432), as pgx and asyncpg take them. pgx skips
    # an empty entry (a stray comma); asyncpg failed on it with an IndexError, a traceback at start.
    user_info, at, host_list = parts.netloc.rpartition("@")
    entries = [part for part in host_list.split(",") if part]
    try:
        hosts = [_split_address(part) for part in entries] or [("", "")]
    except ValueError:
        raise ValueError(_BAD_PORT) from None
    if any(port and not port.isdigit() for _, port in hosts):
        raise ValueError(_BAD_PORT)
    if any(port and not 0 < int(port) < 65536 for _, port in hosts):
        raise ValueError("malformed PostgreSQL URL: the port is not a number between 1 and 65535")
    # Go's parser (the gateway's) refuses a '%' that starts no escape; Python's would keep it.
    if _BAD_ESCAPE.search(parts.netloc.rpartition("@")[0]) or _BAD_ESCAPE.search(parts.path):
        raise ValueError("malformed PostgreSQL URL: a '%' that starts no escape (write '%' as %25)")
    query = "&".join(
        pair for pair in parts.query.split("&") if pair and unquote(pair.partition("=")[0]) not in _PGX_ONLY
    )
    netloc = _encoded_user_info(f"{user_info}{at}{','.join(entries)}")
    url = parts._replace(netloc=netloc, query=query).geturl()
    return PostgresDSN(url, host=hosts[0][0], database=unquote(parts.path.lstrip("/")))


def _encoded_user_info(netloc: str) -> str:
    """`netloc` with its user name and password percent-encoded. Go's URL parser (the gateway's)
    ends them at the last '@', so a password may hold one unencoded; asyncpg ends them at the
    first, and looked up the rest of the password as the host."""
    user_info, at, hosts = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, password = user_info.partition(":")  # the first ':': a password may contain ':'
    encoded = quote(unquote(user), safe="")
    if colon:
        encoded += ":" + quote(unquote(password), safe="")
    return f"{encoded}@{hosts}"


def _split_address(address: str) -> tuple[str, str]:
    """(host, port as written) of `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6
    address; the port '' when there is none. ValueError on text after `]` that is no port."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError("bad IPv6 address")
        return host, rest[1:]
    if address.count(":") == 1:
        host, _, port = address.partition(":")
        return host, port
    return address, ""


# Messages say what is wrong without echoing the DSN, which carries the password.
_NO_SLASH = "malformed MySQL DSN: missing the '/' before the database name"
_UNTERMINATED = "malformed MySQL DSN: network address not terminated (missing ')')"
_UNESCAPED = "malformed MySQL DSN: did you forget to escape a parameter value ('/' as %2F)?"


def parse_mysql_dsn(dsn: str) -> MySQLDSN:
    """Parse `[user[:password]@][protocol[(address)]]/dbname[?params]` as go-sql-driver/mysql does."""
    # The last '/' ends the address (a password or a socket path may contain '/').
    slash = dsn.rfind("/")
    if slash < 0:
        raise ValueError(_NO_SLASH)
    left, right = dsn[:slash], dsn[slash + 1 :]
    user = password = ""
    at = left.rfind("@")  # the last '@': a password may contain '@'
    if at >= 0:
        user, _, password = left[:at].partition(":")  # the first ':': a password may contain ':'
    net_addr = left[at + 1 :]
    net, addr = net_addr, ""
    paren = net_addr.find("(")
    if paren >= 0:
        if not net_addr.endswith(")"):
            raise ValueError(_UNESCAPED if ")" in net_addr[paren:] else _UNTERMINATED)
        net, addr = net_addr[:paren], net_addr[paren + 1 : -1]
    database, _, query = right.partition("?")
    try:
        database = unquote(database, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("malformed MySQL DSN: bad escape in the database name") from None

    params = _params(query)
    net = net or "tcp"
    host, port, unix_socket = "127.0.0.1", MYSQL_PORT, None
    if net == "unix":
        unix_socket = addr or "/tmp/mysql.sock"
    elif net in ("tcp", "tcp4", "tcp6"):
        if addr:
            host, port = _host_port(addr)
    else:
        # (Not the protocol's text: without an '@' it may be the user name and password.)
        raise ValueError("malformed MySQL DSN: unknown protocol (expected tcp or unix)")

    charset = params.get("charset", "utf8mb4").split(",")[0].strip() or "utf8mb4"
    # MySQL 8's name for what the driver knows as utf8 (the server takes either).
    charset = "utf8" if charset.lower() == "utf8mb3" else charset
    timeout = _duration("timeout", params["timeout"]) if "timeout" in params else None
    for name in ("readTimeout", "writeTimeout"):
        if name in params:
            _duration(name, params[name])  # checked like the driver does; our own timeouts apply
    for name in ("parseTime", "allowNativePasswords", "allowOldPasswords", "clientFoundRows", "multiStatements"):
        if name in params:
            _bool(name, params[name])
    tls = params.get("tls", "false")
    if tls.lower() in ("1", "true"):
        tls = "true"
    elif tls.lower() in ("0", "false"):
        tls = "false"
    elif tls.lower() in ("skip-verify", "preferred"):  # in any case, as the gateway's driver reads it
        tls = tls.lower()
    else:
        raise ValueError("malformed MySQL DSN: tls must be true, false, skip-verify or preferred")
    return MySQLDSN(
        user=user,
        password=password,
        host=host,
        port=port,
        unix_socket=unix_socket,
        database=database,
        charset=charset,
        connect_timeout=timeout,
        tls=tls,
    )


def _params(query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in query.split("&") if query else ():
        name, found, raw = item.partition("=")
        if not found:
            continue  # the driver skips a parameter without '='
        try:
            params[name] = unquote(raw.replace("+", " "), errors="strict")
        except UnicodeDecodeError:
            raise ValueError(f"malformed MySQL DSN: bad escape in parameter {name!r}") from None
    return params


def _host_port(addr: str) -> tuple[str, int]:
    try:
        host, port = _split_address(addr)
    except ValueError:
        raise ValueError("malformed MySQL DSN: bad IPv6 address") from None
    if not port:
        return host, MYSQL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("malformed MySQL DSN: the port is not a number between 1 and 65535")
    return host, int(port)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(name: str, value: str) -> float:
    """Read a Go duration ('30s', '1m30s', '500ms') as seconds."""
    text = value.lstrip("+")
    if text == "0":
        return 0.0
    seconds, position = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f"malformed MySQL DSN: {name} is not a duration such as 10s or 500ms")
    return seconds


def _bool(name: str, value: str) -> bool:
    if value in ("1", "true", "TRUE", "True"):
        return True
    if value in ("0", "false", "FALSE", "False"):
        return False
    raise ValueError(f"malformed MySQL DSN: {name} must be true or false")
