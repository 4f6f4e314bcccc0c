"""A real redis-server on a free loopback port, for tests (no fakeredis)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """Start, stop and restart one redis-server process (in-memory, no persistence)."""

    def __init__(self, port: int | None = None, replica_of: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server (.ci/run does this)")
        self.binary = binary
        self.port = port or free_port()
        self.replica_of = replica_of  # the port of this server's master on 127.0.0.1 (a replica)
        self.dir = tempfile.mkdtemp(prefix="ssegate-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--protected-mode", "yes"]
        return args + (["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else [])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen([self.binary, *self.args()], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)


class SentinelServer(RedisServer):
    """A Redis Sentinel (``redis-server <conf> --sentinel``) on a free loopback port, watching the master of
    ``service`` on ``master_port``, alone (quorum 1), quick to call it down (1 s)."""

    def __init__(self, master_port: int, service: str = "mymaster") -> None:
        super().__init__()
        self.master_port, self.service = master_port, service

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}"

    def args(self) -> list[str]:
        conf = f"{self.dir}/sentinel.conf"
        with open(conf, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
                    f"sentinel down-after-milliseconds {self.service} 1000\n"
                    f"sentinel failover-timeout {self.service} 5000\n")
        return [conf, "--sentinel"]

    def flush(self) -> None:
        raise NotImplementedError("a Sentinel holds no data")
