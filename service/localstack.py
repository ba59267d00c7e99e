"""Start and stop a project-local Mosquitto and Postgres (for `make up`, the demo and the tests)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BROKER_CONF_D = REPO / "broker" / "conf.d"


class StackError(RuntimeError):
    """A local server could not be started."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"server exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Send SIGTERM and wait for the process to go (the broker saves its state meanwhile)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


# ---- Mosquitto ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    directory: Path
    port: int
    tls_port: int | None = None

    @property
    def pid_file(self) -> Path:
        return self.directory / "mosquitto.pid"

    @property
    def conf(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log(self) -> Path:
        return self.directory / "mosquitto.log"


def broker_conf(b: Broker, tls: tuple[Path, Path, Path] | None = None) -> str:
    """Render a local broker configuration that includes the project's broker/conf.d."""
    lines = [
        f"pid_file {b.pid_file}",
        "per_listener_settings false",
        "persistence true",
        f"persistence_location {b.directory}/",
        f"password_file {b.directory / 'passwd'}",
        f"acl_file {b.directory / 'acl'}",
        f"log_dest file {b.log}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"listener {b.port} 127.0.0.1",
    ]
    if os.geteuid() == 0:
        # Mosquitto drops root to user `mosquitto`, which cannot read private temp directories.
        lines.insert(0, "user root")
    if tls is not None and b.tls_port is not None:
        ca, cert, key = tls
        lines += [
            f"listener {b.tls_port} 127.0.0.1",
            f"cafile {ca}",
            f"certfile {cert}",
            f"keyfile {key}",
        ]
    lines.append(f"include_dir {BROKER_CONF_D}")
    return "\n".join(lines) + "\n"


def start_broker(b: Broker, tls: tuple[Path, Path, Path] | None = None) -> subprocess.Popen[bytes]:
    """Start Mosquitto on b.port with the project's configuration; return the process."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise StackError("mosquitto is not installed (apt-get install mosquitto)")
    b.directory.mkdir(parents=True, exist_ok=True)
    for name in ("passwd", "acl"):
        f = b.directory / name
        if not f.exists():
            f.touch(mode=0o600)
    b.conf.write_text(broker_conf(b, tls))
    with open(b.directory / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            [exe, "-c", str(b.conf)], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    try:
        wait_port(b.port, proc=proc)
        if b.tls_port is not None and tls is not None:
            wait_port(b.tls_port, proc=proc)
    except StackError as exc:
        stop_broker(proc)
        text = (b.directory / "stderr.log").read_text(errors="replace")
        log = b.log.read_text() if b.log.exists() else ""
        raise StackError(f"mosquitto did not start: {exc}\n{text}{log}") from None
    return proc


def stop_broker(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a broker we started and reap it (it saves its persistence file first)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- Postgres ----------------------------------------------------------------------------------


def pg_bindir() -> Path:
    """Find PostgreSQL's server binaries (Debian keeps them out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("initdb")
    if exe:
        return Path(exe).parent
    raise StackError("PostgreSQL server binaries not found (apt-get install postgresql)")


def _as_db_user(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; Debian's package brings the `postgres` user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass(frozen=True)
class Database:
    directory: Path
    port: int
    user: str = "chargeshare"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, dbname: str = "chargeshare") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"


def start_postgres(d: Database, *, fsync: bool = True) -> None:
    """Create the cluster if needed and start it on d.port (returns when it accepts connections)."""
    bindir = pg_bindir()
    d.directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(d.directory, "postgres", "postgres")
    if not (d.data / "PG_VERSION").exists():
        init = subprocess.run(
            _as_db_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(d.data),
                    "-U",
                    d.user,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            check=False,
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            raise StackError(
                f"initdb failed in {d.data} (the postgres user must be able to reach it): "
                f"{init.stderr.strip()}"
            )
    opts = f"-p {d.port} -k {d.directory} -c listen_addresses=127.0.0.1"
    if not fsync:
        opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    done = subprocess.run(
        _as_db_user(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(d.data),
                "-l",
                str(d.directory / "postgres.log"),
                "-o",
                opts,
                "-w",
                "start",
            ]
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        log = (
            (d.directory / "postgres.log").read_text()
            if (d.directory / "postgres.log").exists()
            else ""
        )
        raise StackError(f"postgres did not start: {done.stdout}{done.stderr}\n{log[-2000:]}")
    _createdb(d, "chargeshare")


def _createdb(d: Database, name: str) -> None:
    bindir = pg_bindir()
    psql = [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(d.port), "-U", d.user]
    exists = subprocess.run(
        [*psql, "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
        capture_output=True,
        text=True,
        check=True,
    )
    if exists.stdout.strip() != "1":
        subprocess.run(
            [*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{name}"'],
            capture_output=True,
            check=True,
        )


def stop_postgres(d: Database, mode: str = "fast") -> None:
    """Stop the cluster (no error if it is not running)."""
    if not (d.data / "postmaster.pid").exists():
        return
    subprocess.run(
        _as_db_user([str(pg_bindir() / "pg_ctl"), "-D", str(d.data), "-m", mode, "-w", "stop"]),
        capture_output=True,
        check=False,
    )
