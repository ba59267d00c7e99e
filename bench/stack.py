"""The benchmark's local stack: Mosquitto, Postgres and the service as measured subprocesses."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from service import localstack
from service.brokeradmin import BrokerFiles

SERVICE_USER = "chargeshare-service"
OWNER = "bench"
PARTNER = "bench-partner"
LOCATION_SECRET = "bench-location-secret-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds a process used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid: int, key: str = "VmHWM") -> int:
    """Return one memory figure of /proc/<pid>/status in KiB (VmHWM = peak RSS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class ServiceProc:
    """One `chargeshare serve` replica."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_kb(self) -> int:
        return memory_kb(self.pid)


@dataclass
class Stack:
    """Postgres for the whole run; a fresh broker per size; service replicas on demand."""

    directory: Path
    passwords: dict[str, str] = field(default_factory=dict)
    broker: localstack.Broker | None = None
    broker_proc: subprocess.Popen[bytes] | None = None
    database: localstack.Database | None = None

    def start(self) -> None:
        """Start Postgres and write the broker's accounts."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)
        self.passwords = {u: secrets.token_urlsafe(12) for u in (SERVICE_USER, OWNER, PARTNER)}
        files = BrokerFiles(self.directory / "broker")
        for user, pw in self.passwords.items():
            files.set_password(user, pw)
        files.write_acl(SERVICE_USER, [OWNER], [PARTNER])
        self.database = localstack.Database(self.directory / "pg", localstack.free_port())
        localstack.start_postgres(self.database)

    def restart_broker(self) -> localstack.Broker:
        """Start a broker with empty persistence (no retained messages from earlier sizes)."""
        self.stop_broker()
        directory = self.directory / "broker"
        for leftover in ("mosquitto.db", "mosquitto.log"):
            (directory / leftover).unlink(missing_ok=True)
        self.broker = localstack.Broker(directory, localstack.free_port())
        self.broker_proc = localstack.start_broker(self.broker)
        return self.broker

    def stop_broker(self) -> None:
        if self.broker_proc is not None:
            localstack.stop_broker(self.broker_proc)
            self.broker_proc = None

    @property
    def port(self) -> int:
        assert self.broker is not None
        return self.broker.port

    def broker_pid(self) -> int:
        assert self.broker_proc is not None
        return self.broker_proc.pid

    async def fresh_database(self, name: str) -> str:
        """Drop and create one database; return its URL."""
        assert self.database is not None
        conn = await asyncpg.connect(self.database.url("postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.database.url(name)

    def start_service(
        self, database_url: str, client_id: str, share_group: str, **env: str
    ) -> ServiceProc:
        """Run `chargeshare serve` with CHARGESHARE_* settings; return once it is subscribed."""
        log = self.directory / f"{client_id}.log"
        settings = {
            "CHARGESHARE_DATABASE_URL": database_url,
            "CHARGESHARE_MQTT_HOST": "127.0.0.1",
            "CHARGESHARE_MQTT_PORT": str(self.port),
            "CHARGESHARE_MQTT_USERNAME": SERVICE_USER,
            "CHARGESHARE_MQTT_PASSWORD": self.passwords[SERVICE_USER],
            "CHARGESHARE_CLIENT_ID": client_id,
            "CHARGESHARE_SHARE_GROUP": share_group,
            "CHARGESHARE_LOCATION_SECRET": LOCATION_SECRET,
            "CHARGESHARE_API_PORT": str(localstack.free_port()),
            "CHARGESHARE_LOG_JSON": "1",
            **env,
        }
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGESHARE_")}
        full_env.update(settings)
        exe = Path(sys.executable).parent / "chargeshare"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(exe), "serve"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        svc = ServiceProc(client_id, proc, log)
        deadline = time.monotonic() + 60
        while b"service running" not in log.read_bytes():
            if proc.poll() is not None:
                raise RuntimeError(f"service {client_id} exited: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"service {client_id} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        return svc

    @staticmethod
    def stop_service(svc: ServiceProc) -> None:
        localstack.stop_pid(svc.pid)
        try:
            svc.proc.wait(5)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait()

    def postgres_cpu(self) -> float:
        """Return the CPU seconds of the Postgres server and all its backends so far."""
        assert self.database is not None
        try:
            master = int((self.database.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        total = cpu_seconds(master)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def stop(self) -> None:
        """Stop the broker and Postgres."""
        self.stop_broker()
        if self.database is not None:
            localstack.stop_postgres(self.database)
