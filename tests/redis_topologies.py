"""Redis Sentinel and Cluster deployments for the tests: real redis-server and redis-sentinel
processes on free loopback ports, and a common description of any topology for fixtures."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from support import RedisServer, free_port, wait_until


@dataclass
class RedisTopology:
    """How a test reaches one Redis deployment: settings for the app, environment for the process."""

    name: str
    url: str
    # Settings fields besides redis_url (the tests pass redis_url themselves).
    mode_settings: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    client: Callable[[], Any] = field(default=lambda: None)


class SentinelGroup:
    """A master, one replica and three sentinels watching them, as a small production setup has."""

    def __init__(self, workdir: Path, master_name: str = "mymaster", down_after_ms: int = 1000) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError("redis-sentinel is not installed; run scripts/test, which installs it")
        self.binary = binary
        self.workdir = workdir
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(workdir / "replica", "--replicaof", "127.0.0.1", str(self.master.port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(("127.0.0.1", port) for port in self.sentinel_ports)

    def topology(self) -> RedisTopology:
        url = f"redis://127.0.0.1:{self.master.port}/0"  # the host is not used: the sentinels name the master
        sentinels = ",".join(f"{host}:{port}" for host, port in self.addresses)
        return RedisTopology(
            name="sentinel",
            url=url,
            mode_settings={
                "redis_mode": "sentinel",
                "redis_sentinels": self.addresses,
                "redis_master_name": self.master_name,
            },
            env={
                "REDIS_CONN_STRING": url,
                "USAGE_REDIS_MODE": "sentinel",
                "USAGE_REDIS_SENTINELS": sentinels,
                "USAGE_REDIS_MASTER_NAME": self.master_name,
            },
            client=self.master_client,
        )

    def master_client(self) -> redis.Redis:
        host, port = self.master_address()
        return redis.Redis(host=host, port=port)

    def master_address(self) -> tuple[str, int]:
        """Where the sentinels say the master is now."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), redis.Redis(port=port, socket_timeout=1) as sentinel:
                address = sentinel.sentinel_get_master_addr_by_name(self.master_name)
                if address:
                    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
                    return host, int(address[1])
        raise RuntimeError("no sentinel names a master")

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        for port in self.sentinel_ports:
            workdir = self.workdir / f"sentinel-{port}"
            workdir.mkdir(parents=True, exist_ok=True)
            config = workdir / "sentinel.conf"  # sentinels rewrite their configuration: one file each
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\nlogfile {workdir / 'sentinel.log'}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} 10000\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen([self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        # Ready when the replica is in sync and every sentinel knows the replica and the others
        # (they find each other through the master every 2 s): only then can they fail over.
        if not wait_until(self._ready, timeout=30, interval=0.2):
            self.stop()
            raise RuntimeError("the sentinels did not discover the replica and each other")

    def _ready(self) -> bool:
        try:
            with redis.Redis(port=self.replica.port, socket_timeout=1) as replica:
                if replica.info("replication").get("master_link_status") != "up":
                    return False
            for port in self.sentinel_ports:
                with redis.Redis(port=port, socket_timeout=1) as sentinel:
                    if len(sentinel.sentinel_slaves(self.master_name)) != 1:
                        return False
                    if len(sentinel.sentinel_sentinels(self.master_name)) != 2:
                        return False
        except redis.RedisError:
            return False
        return True

    def stop(self) -> None:
        for process in self.sentinels:
            process.kill()
            process.wait(timeout=10)
        self.sentinels.clear()
        self.replica.stop()
        self.master.stop()


class RedisClusterNodes:
    """A Redis Cluster of three masters (no replicas), created with `redis-cli --cluster create`."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed; run scripts/test, which installs it")
        self.cli = cli
        self.nodes = [
            # Its own bus port: the default (port + 10000) may be taken, or past 65535.
            RedisServer(
                workdir / f"node{i}",
                *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                *("--cluster-node-timeout", "2000", "--cluster-port", str(free_port())),
            )
            for i in range(masters)
        ]

    def topology(self) -> RedisTopology:
        url = f"redis://127.0.0.1:{self.nodes[0].port}/0"
        seeds = tuple(("127.0.0.1", node.port) for node in self.nodes[1:])
        return RedisTopology(
            name="cluster",
            url=url,
            mode_settings={"redis_mode": "cluster", "redis_cluster_nodes": seeds},
            env={
                "REDIS_CONN_STRING": url,
                "USAGE_REDIS_MODE": "cluster",
                "USAGE_REDIS_CLUSTER_NODES": ",".join(f"{h}:{p}" for h, p in seeds),
            },
            client=lambda: redis.RedisCluster.from_url(url),
        )

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            timeout=60,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if not wait_until(self._ready, timeout=30, interval=0.1):
            self.stop()
            raise RuntimeError("the cluster did not reach cluster_state:ok")

    def _ready(self) -> bool:
        try:
            for node in self.nodes:
                with redis.Redis(port=node.port, socket_timeout=1) as client:
                    if client.cluster("info").get("cluster_state") != "ok":
                        return False
        except redis.RedisError:
            return False
        return True

    def keys_per_node(self, pattern: str) -> list[int]:
        counts = []
        for node in self.nodes:
            with redis.Redis(port=node.port) as client:
                counts.append(sum(1 for _ in client.scan_iter(pattern)))
        return counts

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    if not wait_until(predicate, timeout=timeout, interval=0.05):
        raise AssertionError(f"{what}: not within {timeout} s")


def now() -> float:
    return time.monotonic()
