"""The deployment files: docker-compose.yml against the Compose specification, the nginx
configuration (checked by `nginx -t` and run in front of real sidecars), the Kubernetes example,
and the operators' defaults they rely on: trusted proxies, the demo's address, the documented
PostgreSQL grants.

No Docker engine or cluster runs here, so the files are checked for what a schema and a close
reading can tell: that Compose would accept them, and that each profile wires up what it says.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from dbservers import POSTGRES_SCHEMA, READER, READER_PASSWORD, PostgresServer, documented_grants
from support import Gateway, Service, environ_without_gateway_settings, free_port, wait_until

from usage_service.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "config" / "nginx" / "scaled.conf"
K8S_FILE = ROOT / "config" / "k8s" / "new-api-with-usage-service.yaml"
GATEWAY_IMAGE = "calciumion/new-api"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def compose_schema() -> dict[str, Any]:
    """The Compose specification's JSON schema, as the check-jsonschema package ships it.

    Source: https://github.com/compose-spec/compose-spec/blob/main/schema/compose-spec.json,
    Apache License 2.0 (the package carries the licence in builtin_schemas/vendor/licenses/).
    """
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def services_in(compose: dict[str, Any], profile: str | None) -> dict[str, dict[str, Any]]:
    """The services `docker compose` starts with this profile enabled (None: no profile)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


# --- docker-compose.yml -----------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_check_can_fail(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["usage-service"]["restart"] = ["always"]
    broken["services"]["proxy"]["profiles"] = "scaled"
    schema = compose_schema()
    assert len(list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))) == 2


@pytest.mark.parametrize("profile", [None, "scaled"])
def test_every_dependency_starts_with_its_profile(compose: dict[str, Any], profile: str | None) -> None:
    enabled = services_in(compose, profile)
    for name, service in enabled.items():
        assert set(service.get("depends_on", {})) <= set(enabled), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"


def test_embedded_default_reads_the_gateways_sqlite_file_read_only(compose: dict[str, Any]) -> None:
    default = services_in(compose, None)
    assert set(default) == {"redis", "new-api", "usage-service"}
    gateway, sidecar = default["new-api"], default["usage-service"]
    assert gateway["image"].startswith(GATEWAY_IMAGE)
    assert "new-api-data:/data:ro" in sidecar["volumes"]
    for name in ("SQLITE_PATH", "REDIS_CONN_STRING"):
        assert sidecar["environment"][name] == gateway["environment"][name]
    load_settings(sidecar["environment"])  # the sidecar would start with it


def test_scaled_profile_runs_two_sidecars_behind_nginx(compose: dict[str, Any]) -> None:
    scaled = {name: s for name, s in compose["services"].items() if "scaled" in s.get("profiles", [])}
    assert set(scaled) == {"postgres", "postgres-grants", "gateway", "usage-service-1", "usage-service-2", "proxy"}
    gateway = scaled["gateway"]
    assert gateway["image"].startswith(GATEWAY_IMAGE)
    assert gateway["environment"]["SQL_DSN"].startswith("postgresql://")
    sidecars = [scaled["usage-service-1"], scaled["usage-service-2"]]
    for sidecar in sidecars:
        env = sidecar["environment"]
        # The gateway's conventions: a postgresql:// DSN on the same database, the same Redis,
        # but as the read-only role that config/postgres/init-readonly.sh creates, once the
        # gateway's tables exist and it may read them.
        assert env["SQL_DSN"].startswith("postgresql://usage_service:")
        assert sidecar["depends_on"]["postgres-grants"] == {"condition": "service_completed_successfully"}
        assert env["SQL_DSN"].rsplit("@", 1)[1] == gateway["environment"]["SQL_DSN"].rsplit("@", 1)[1]
        assert env["REDIS_CONN_STRING"] == gateway["environment"]["REDIS_CONN_STRING"]
        assert "volumes" not in sidecar  # nothing of the gateway's to mount: it reads the database
        assert load_settings(env).database.host == "postgres"  # type: ignore[union-attr]
    proxy = scaled["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert "./config/nginx/scaled.conf:/etc/nginx/conf.d/default.conf:ro" in proxy["volumes"]
    assert set(proxy["depends_on"]) == {"gateway", "usage-service-1", "usage-service-2"}
    # nginx's upstreams name exactly these services on the ports they listen on.
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\}", NGINX_CONF.read_text(), re.S))
    assert re.findall(r"server ([\w-]+:\d+)", upstreams["usage_service"]) == [
        "usage-service-1:3001",
        "usage-service-2:3001",
    ]
    assert re.findall(r"server ([\w-]+:\d+)", upstreams["new_api"]) == ["gateway:3000"]


def test_scaled_sidecars_trust_nginx_and_nothing_else(compose: dict[str, Any]) -> None:
    """Behind nginx every client would be nginx's address: one client's bad keys would give every
    client 429. The sidecars believe nginx's X-Forwarded-For, and no other container's."""
    (network,) = compose["networks"]["default"]["ipam"]["config"]
    subnet, dynamic = ipaddress.ip_network(network["subnet"]), ipaddress.ip_network(network["ip_range"])
    docker_gateway = ipaddress.ip_address(network["gateway"])
    nginx = ipaddress.ip_address(compose["services"]["proxy"]["networks"]["default"]["ipv4_address"])
    # nginx's address is pinned, in the subnet, where no other container can be given it.
    assert nginx in subnet and nginx not in dynamic
    for name in ("usage-service-1", "usage-service-2"):
        trusted = load_settings(compose["services"][name]["environment"]).trusted_proxies
        assert any(nginx in proxy for proxy in trusted), name
        # Not the containers' range, nor the network's gateway (Docker's userland proxy
        # connects from there): those could name any client they like.
        assert not any(proxy.overlaps(dynamic) or docker_gateway in proxy for proxy in trusted), name
    # And nginx appends the client it sees on every route to the sidecars.
    locations = re.findall(r"location ([^{]+)\{(.*?)\n    \}", NGINX_CONF.read_text(), re.S)
    to_sidecars = [body for _, body in locations if "proxy_pass http://usage_service;" in body]
    assert len(to_sidecars) == 3  # polls, the log, billing
    assert all("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in body for body in to_sidecars)


# --- nginx ------------------------------------------------------------------------------------


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def local_nginx_conf(workdir: Path, port: int, usage: tuple[int, int], gateway: int) -> Path:
    """The scaled configuration as nginx would load it in the image, with loopback addresses."""
    site = NGINX_CONF.read_text()
    site = site.replace("usage-service-1:3001", f"127.0.0.1:{usage[0]}")
    site = site.replace("usage-service-2:3001", f"127.0.0.1:{usage[1]}")
    site = site.replace("gateway:3000", f"127.0.0.1:{gateway}").replace("listen 80;", f"listen 127.0.0.1:{port};")
    site = site.replace("/var/log/nginx/access.log", f"{workdir}/access.log")
    site = site.replace("/var/log/nginx/error.log", f"{workdir}/error.log")
    (workdir / "default.conf").write_text(site)
    main = workdir / "nginx.conf"
    main.write_text(
        f"daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log;\n"
        "events {}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {workdir}/body;\n  proxy_temp_path {workdir}/proxy;\n"
        f"  include {workdir}/default.conf;\n}}\n"
    )
    return main


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    nginx = nginx_binary()
    if nginx is None:
        # scripts/test installs nginx; without it, at least check the blocks and statements.
        text = re.sub(r"#.*", "", NGINX_CONF.read_text())
        assert text.count("{") == text.count("}")
        assert all(line.rstrip().endswith((";", "{", "}")) for line in text.splitlines() if line.strip())
        return
    main = local_nginx_conf(tmp_path, free_port(), (free_port(), free_port()), free_port())
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(main)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


class _StubGateway(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"gateway": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def stub_gateway() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
def test_nginx_routes_polls_to_the_sidecars_and_the_rest_to_the_gateway(tmp_path: Path, redis_url: str) -> None:
    """The scaled profile's nginx, in front of two real sidecars and a stand-in gateway."""
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (scripts/test installs it)")
    db = Gateway(tmp_path / "one-api.db")
    token = db.add_token(used=11)
    env = {"SQLITE_PATH": str(db.path), "REDIS_CONN_STRING": redis_url}
    with stub_gateway() as gateway_port, Service(env) as first, Service(env) as second:
        port = free_port()
        main = local_nginx_conf(tmp_path, port, (first.port, second.port), gateway_port)
        proxy = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-c", str(main)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            base = f"http://127.0.0.1:{port}"
            assert wait_until(lambda: _answers(base + "/api/status"), timeout=10), (tmp_path / "error.log").read_text()
            assert httpx.get(base + "/api/status").json() == {"gateway": True, "path": "/api/status"}
            assert httpx.get(base + "/v1/models").json()["gateway"] is True
            for path in ("/api/usage/token", "/api/usage/token/"):
                for _ in range(4):  # round robin: both sidecars answer
                    response = httpx.get(base + path, headers=token.bearer)
                    assert response.status_code == 200, response.text
                    assert response.json()["data"]["total_used"] == 11
            for path in (
                "/v1/dashboard/billing/subscription",
                "/dashboard/billing/usage/",
                "/api/log/token",
                "/api/log/token/",
                "/api/usage/token/history",
            ):
                response = httpx.get(base + path, headers=token.bearer)
                assert response.status_code == 200 and "gateway" not in response.json(), response.text
            legacy = httpx.get(base + "/api/log/token", params={"key": f"sk-{token.key}"})  # older key checkers
            assert legacy.status_code == 200, legacy.text
            assert httpx.get(base + f"/api/usage/sk-{token.key}").status_code == 401  # no credential
            assert httpx.get(base + "/v1/dashboard/billing/other").json()["gateway"] is True
            assert httpx.get(base + "/api/log/self").json()["gateway"] is True
            assert _polls_answered(first) > 0 and _polls_answered(second) > 0
            # One sidecar goes away: polls keep being answered by the other.
            first.stop()
            for _ in range(2):  # one of them tried on the replica that is down first: an error
                assert httpx.get(base + "/api/log/token", params={"key": f"sk-{token.key}"}).status_code == 200
            for _ in range(6):
                response = httpx.get(base + "/api/usage/token", headers=token.bearer)
                assert response.status_code == 200, response.text
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
    db.close()
    # nginx's own logs never hold the key, nor a piece of it.
    logged = (tmp_path / "access.log").read_text()
    assert '"GET /api/log/token" 200' in logged and '"GET [a path with a key]" 401' in logged, logged
    logged += (tmp_path / "error.log").read_text()
    assert not any(token.key[i : i + 6] in logged for i in range(len(token.key) - 5)), logged


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("trusted", "other_client_status"),
    [
        pytest.param("127.0.0.1", 401, id="nginx-trusted"),
        # Without it, every client is nginx: one client's failures throttle everyone.
        pytest.param("", 429, id="nginx-not-trusted"),
    ],
)
def test_behind_nginx_the_limiter_counts_each_client(tmp_path: Path, trusted: str, other_client_status: int) -> None:
    """nginx appends the client to X-Forwarded-For; a sidecar that trusts nginx (as the scaled
    profile's do, 127.0.0.1 here standing for nginx's pinned address) counts each client alone."""
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (scripts/test installs it)")
    db = Gateway(tmp_path / "one-api.db")
    env = {"SQLITE_PATH": str(db.path), "USAGE_AUTH_FAIL_LIMIT": "3", "USAGE_TRUSTED_PROXIES": trusted}
    bad = {"Authorization": "Bearer sk-" + "x" * 48}
    with stub_gateway() as gateway_port, Service(env) as sidecar:
        port = free_port()
        main = local_nginx_conf(tmp_path, port, (sidecar.port, sidecar.port), gateway_port)
        proxy = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-c", str(main)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            url = f"http://127.0.0.1:{port}/api/usage/token"
            assert wait_until(lambda: _answers(f"http://127.0.0.1:{port}/api/status"), timeout=10)
            # Two clients, told apart by the loopback address they connect from.
            with _client_from("127.0.0.2") as first, _client_from("127.0.0.3") as second:
                assert [first.get(url, headers=bad).status_code for _ in range(4)] == [401, 401, 401, 429]
                assert second.get(url, headers=bad).status_code == other_client_status
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
    db.close()


def _client_from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=5)


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=1).status_code == 200
    return False


def _polls_answered(service: Service) -> float:
    """Token lookups this sidecar resolved, whatever the layer, read from its /metrics."""
    text = httpx.get(service.url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("usage_cache_hits_total", "usage_db_lookups_total")):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(K8S_FILE.read_text()) if d]
    return {d["kind"]: d for d in documents}


def test_k8s_sidecar_runs_in_the_gateways_pod_with_probes(k8s: dict[str, dict[str, Any]]) -> None:
    assert set(k8s) == {"Deployment", "PersistentVolumeClaim", "Service", "Ingress"}
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"new-api", "usage-service"}
    gateway, sidecar = containers["new-api"], containers["usage-service"]
    assert gateway["image"].startswith(GATEWAY_IMAGE)
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"usage": 3001}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "usage"}
    # Once started, never unready for its database: in the gateway's pod, that would take the
    # gateway out of the Service too.
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "usage"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "usage"}
    # The same database file and Redis as the gateway, the file mounted read-only.
    env = {e["name"]: e for e in sidecar["env"]}
    gateway_env = {e["name"]: e for e in gateway["env"]}
    for name in ("SQLITE_PATH", "REDIS_CONN_STRING"):
        assert env[name] == gateway_env[name]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    gateway_mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    assert mounts["data"]["readOnly"] is True and mounts["data"]["mountPath"] == gateway_mounts["data"]["mountPath"]
    assert {v["name"] for v in pod["volumes"]} >= {m["name"] for m in sidecar["volumeMounts"]}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True


def test_k8s_routes_usage_polls_to_the_sidecar_port(k8s: dict[str, dict[str, Any]]) -> None:
    service = k8s["Service"]
    assert service["spec"]["selector"] == k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["usage"]["targetPort"] == "usage" and service_ports["http"]["targetPort"] == "http"
    paths = {
        p["path"]: (p["pathType"], p["backend"]["service"]["name"], p["backend"]["service"]["port"]["name"])
        for rule in k8s["Ingress"]["spec"]["rules"]
        for p in rule["http"]["paths"]
    }
    name = service["metadata"]["name"]
    billing = [f"{v1}/dashboard/billing/{what}" for v1 in ("", "/v1") for what in ("subscription", "usage")]
    assert paths == {
        "/api/usage/": ("Prefix", name, "usage"),
        "/api/log/token": ("Prefix", name, "usage"),
        **{path: ("Prefix", name, "usage") for path in billing},
        "/": ("Prefix", name, "http"),
    }


def test_k8s_sidecar_trusts_the_ingress_controller(k8s: dict[str, dict[str, Any]]) -> None:
    """The Ingress controller is every client's peer: its X-Forwarded-For must be believed."""
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    (sidecar,) = (c for c in pod["containers"] if c["name"] == "usage-service")
    values = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    trusted = load_settings(values).trusted_proxies
    assert trusted, "USAGE_TRUSTED_PROXIES is not set"
    # A cluster's pod range: private, and not the whole address space.
    assert all(proxy.is_private and proxy.prefixlen >= 8 for proxy in trusted)
    assert any(ipaddress.ip_address("10.244.1.7") in proxy for proxy in trusted)  # an ingress-nginx pod on kind


# --- the demo ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("flags", "listening"),
    [
        pytest.param([], {"127.0.0.1"}, id="loopback-by-default"),
        pytest.param(["--host", "0.0.0.0"], {"0.0.0.0"}, id="network-when-asked"),
    ],
)
def test_demo_listens_on_loopback_unless_told(tmp_path: Path, flags: list[str], listening: set[str]) -> None:
    """The demo prints its token and serves /metrics: it must not be reachable from the network."""
    port = free_port()
    command = [sys.executable, "-m", "usage_service", "--demo", "--port", str(port), *flags]
    env = environ_without_gateway_settings()
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as demo:
        try:
            assert wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout=20)
            assert _listening_addresses(port) == listening
        finally:
            demo.terminate()
            demo.wait(timeout=15)


def _listening_addresses(port: int) -> set[str]:
    """The addresses sockets listen on at this port, from the kernel's own table (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # each 32-bit word in the host's byte order
                found.add(str(ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))))
    return found


# --- the documented PostgreSQL grants ---------------------------------------------------------


def test_the_scaled_profiles_grant_is_the_documented_one() -> None:
    """The Compose profile's one-shot grant lets the sidecars read what docs/databases.md grants
    (the log included: without it every history and log route is 503), and waits for all of it."""
    script = (ROOT / "config" / "postgres" / "grant-readonly.sh").read_text()
    (granted,) = re.findall(r"'(GRANT SELECT ON [^']*)'", script)
    (documented,) = [g for g in documented_grants("PostgreSQL", "new-api") if g.startswith("GRANT SELECT ON")]
    assert granted == documented
    tables = documented.removeprefix("GRANT SELECT ON ").split(" TO ")[0]
    assert f"SELECT 1 FROM {tables} LIMIT 0" in script


@pytest.mark.parametrize(
    "public_create",
    [
        pytest.param(False, id="postgres-15-defaults"),
        # PostgreSQL 14 and older let every role create tables in public.
        pytest.param(True, id="postgres-14-defaults"),
    ],
)
def test_documented_postgres_role_can_only_read(postgres_server: PostgresServer, public_create: bool) -> None:
    """docs/databases.md's statements, run as it says (a superuser), leave a role that reads the
    four tables and can neither write them nor create a table, even in a read-write session."""
    import psycopg
    from psycopg import errors

    database = f"grants-{int(public_create)}"
    with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}"')  # type: ignore[arg-type]
        admin.execute(f'CREATE DATABASE "{database}"')  # type: ignore[arg-type]
        role_exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER,)).fetchone()
    with psycopg.connect(postgres_server.url(database), autocommit=True) as owner:
        if public_create:
            owner.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        owner.execute(POSTGRES_SCHEMA)  # type: ignore[arg-type]
        for statement in documented_grants("PostgreSQL", database, postgres_server.superuser):
            if not (role_exists and statement.startswith("CREATE ROLE")):  # one role for the cluster
                owner.execute(statement)  # type: ignore[arg-type]
    reader_url = postgres_server.url(database, READER, urllib.parse.quote(READER_PASSWORD, safe=""))
    with psycopg.connect(reader_url, autocommit=True) as reader:
        for table in ("tokens", "users", "options", "logs"):
            reader.execute(f"SELECT count(*) FROM {table}")  # type: ignore[arg-type]
        # The session's read-only default is the role's own setting, which it may lift: the
        # privileges must hold without it.
        reader.execute("SET default_transaction_read_only = off")
        for statement in (
            "CREATE TABLE intruder (x int)",
            "CREATE TABLE public.intruder (x int)",
            "UPDATE tokens SET name = 'x'",
            "INSERT INTO options (\"key\", \"value\") VALUES ('x', 'y')",
            "DELETE FROM users",
            "DELETE FROM logs",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                reader.execute(statement)  # type: ignore[arg-type]
