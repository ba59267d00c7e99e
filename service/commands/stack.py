"""`chargeshare stack up|down|status`: the project-local stack of `make up` (DESIGN §6)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import asyncpg
import typer

from service import brokeradmin, errors, localstack
from service.adapters import accounts, schema
from service.config import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False)

HEALTH_TIMEOUT_S = 20.0
PORT_NAMES = ("mqtt", "postgres", "api")


@dataclass(frozen=True)
class Layout:
    """Where the stack keeps its state: everything lives under one directory."""

    root: Path

    @property
    def ports_file(self) -> Path:
        return self.root / "ports.json"

    @property
    def env_file(self) -> Path:
        return self.root / "stack.env"

    @property
    def secret_file(self) -> Path:
        return self.root / "location.secret"

    @property
    def service_password_file(self) -> Path:
        return self.root / "service.password"

    @property
    def service_log(self) -> Path:
        return self.root / "service.log"

    @property
    def service_pid_file(self) -> Path:
        return self.root / "service.pid"

    def broker(self, port: int) -> localstack.Broker:
        return localstack.Broker(directory=self.root / "broker", port=port)

    def database(self, port: int) -> localstack.Database:
        return localstack.Database(directory=self.root / "postgres", port=port)


def layout(settings: Settings) -> Layout:
    """Return the stack's layout: CHARGESHARE_STACK_DIR or the repository's .run/."""
    return Layout(settings.stack_dir or localstack.REPO / ".run")


# ---- processes ---------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Tell whether a process runs (a zombie nobody reaps counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _read_pid(pid_file: Path, expect: str) -> int | None:
    """Return the pid in the file if that process runs and its command line contains `expect`."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # A stale pid file after a reboot may name an unrelated process: never signal that one.
    if not _alive(pid) or expect not in _cmdline(pid):
        return None
    return pid


def _stop(pid: int, timeout: float = 15.0) -> None:
    """Send SIGTERM, wait for the process to go, SIGKILL it after the timeout."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As servers do: connections of a stopped server lingering in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ---- state -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """The pids of the stack's parts that run now (None = stopped)."""

    broker: int | None
    postgres: int | None
    service: int | None


def running(lay: Layout, ports: dict[str, int]) -> Running:
    """Look at pid files to see what runs."""
    broker = lay.broker(ports.get("mqtt", 0))
    database = lay.database(ports.get("postgres", 0))
    return Running(
        broker=_read_pid(broker.pid_file, "mosquitto"),
        postgres=_read_pid(database.data / "postmaster.pid", "postgres"),
        service=_read_pid(lay.service_pid_file, "serve"),
    )


def load_ports(lay: Layout) -> dict[str, int]:
    """Return the remembered ports (possibly incomplete)."""
    try:
        raw = json.loads(lay.ports_file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in raw.items() if k in PORT_NAMES and isinstance(v, int)}


def assign_ports(lay: Layout, now: Running) -> dict[str, int]:
    """Keep remembered ports, pick free ones for new or taken ones, and remember them."""
    ports = load_ports(lay)
    busy = {"mqtt": now.broker, "postgres": now.postgres, "api": now.service}
    for name in PORT_NAMES:
        if busy[name] is not None and name in ports:
            continue  # ours, running on its remembered port
        if name not in ports or not _port_free(ports[name]):
            ports[name] = localstack.free_port()
    lay.ports_file.write_text(json.dumps(ports, indent=2) + "\n")
    return ports


def _secret_file(path: Path, make: str) -> str:
    """Create the file with `make` (mode 0600) unless it exists; return its content."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(make + "\n")
    return make


def stack_env(lay: Layout, ports: dict[str, int]) -> dict[str, str]:
    """Return what the stack tells its clients (the lines of stack.env)."""
    broker = lay.broker(ports["mqtt"])
    return {
        "CHARGESHARE_MQTT_HOST": "127.0.0.1",
        "CHARGESHARE_MQTT_PORT": str(ports["mqtt"]),
        "CHARGESHARE_DATABASE_URL": lay.database(ports["postgres"]).url(),
        "CHARGESHARE_API_URL": f"http://127.0.0.1:{ports['api']}",
        "CHARGESHARE_BROKER_DIR": str(broker.directory),
        "CHARGESHARE_BROKER_PID_FILE": str(broker.pid_file),
        "CHARGESHARE_LOCATION_SECRET_FILE": str(lay.secret_file),
        # The local stack is for development: partners' webhooks may be plain http on loopback.
        "CHARGESHARE_WEBHOOK_ALLOW_HTTP_LOOPBACK": "1",
    }


def write_env(lay: Layout, env: dict[str, str]) -> None:
    """Write stack.env atomically as shell `KEY=value` lines."""
    tmp = lay.env_file.with_suffix(".tmp")
    tmp.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    os.replace(tmp, lay.env_file)


async def _prepare(settings: Settings, service_password: str) -> list[str]:
    """Migrate the database and write the broker's accounts; return the migrations applied."""
    files = accounts.broker_files(settings)
    files.set_password(settings.mqtt_username, service_password)
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await schema.migrate(conn)
        await accounts.sync_broker(conn, settings)
    finally:
        await conn.close()
    return applied


def _service_command() -> list[str]:
    script = Path(sys.executable).parent / "chargeshare"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "service", "serve"]


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1.0) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def start_service(
    lay: Layout, settings: Settings, env: dict[str, str], ports: dict[str, int]
) -> int:
    """Start `chargeshare serve` in the background and wait until /healthz answers 200."""
    service_env = {
        # The child needs PATH and friends; CHARGESHARE_* set here win over inherited ones.
        **os.environ,
        "CHARGESHARE_DATABASE_URL": env["CHARGESHARE_DATABASE_URL"],
        "CHARGESHARE_MQTT_HOST": env["CHARGESHARE_MQTT_HOST"],
        "CHARGESHARE_MQTT_PORT": env["CHARGESHARE_MQTT_PORT"],
        "CHARGESHARE_MQTT_USERNAME": settings.mqtt_username,
        "CHARGESHARE_MQTT_PASSWORD": lay.service_password_file.read_text().strip(),
        "CHARGESHARE_LOCATION_SECRET_FILE": str(lay.secret_file),
        "CHARGESHARE_BROKER_DIR": env["CHARGESHARE_BROKER_DIR"],
        "CHARGESHARE_BROKER_PID_FILE": env["CHARGESHARE_BROKER_PID_FILE"],
        "CHARGESHARE_API_PORT": str(ports["api"]),
        "CHARGESHARE_WEBHOOK_ALLOW_HTTP_LOOPBACK": "1",
        "CHARGESHARE_LOG_JSON": "1",
    }
    service_env.pop("CHARGESHARE_LOCATION_SECRET", None)  # the file is the stack's secret
    with open(lay.service_log, "ab") as log:
        proc = subprocess.Popen(
            _service_command(),
            env=service_env,
            cwd=localstack.REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    lay.service_pid_file.write_text(f"{proc.pid}\n")
    url = env["CHARGESHARE_API_URL"]
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while True:
        status = proc.poll()
        if status is not None:
            lay.service_pid_file.unlink(missing_ok=True)
            raise localstack.StackError(
                f"the service exited with status {status}; the end of {lay.service_log}:\n"
                + _log_tail(lay.service_log)
            )
        if _healthy(url):
            return proc.pid  # it runs on in its own session after this command exits
        if time.monotonic() > deadline:
            _stop(proc.pid)
            lay.service_pid_file.unlink(missing_ok=True)
            raise localstack.StackError(
                f"{url}/healthz did not answer 200 within {HEALTH_TIMEOUT_S:.0f} s; "
                f"stopped the service; the end of {lay.service_log}:\n" + _log_tail(lay.service_log)
            )
        time.sleep(0.1)


@contextlib.contextmanager
def _failing() -> Iterator[None]:
    """Turn a known failure into a one-line reason on stderr and exit status 1."""
    try:
        yield
    except (localstack.StackError, errors.ChargeShareError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (OSError, asyncpg.PostgresError, subprocess.CalledProcessError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


# ---- commands ----------------------------------------------------------------------------------


@app.command("up")
def up(
    no_service: Annotated[
        bool, typer.Option("--no-service", help="Start only the broker and Postgres.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print stack.env as JSON.")] = False,
) -> None:
    """Start broker, Postgres and the service in the background; state stays under .run/."""
    with _failing():
        settings = Settings.from_env()
        lay = layout(settings)
        lay.root.mkdir(parents=True, exist_ok=True)
        before = running(lay, load_ports(lay))
        wanted = (before.broker, before.postgres) + (() if no_service else (before.service,))
        if all(pid is not None for pid in wanted) and lay.env_file.exists():
            env = stack_env(lay, load_ports(lay))
            if as_json:
                typer.echo(json.dumps(env))
            else:
                typer.echo(f"stack already up; settings in {lay.env_file}")
            return

        ports = assign_ports(lay, before)
        env = stack_env(lay, ports)
        _secret_file(lay.secret_file, secrets.token_hex(32))
        service_password = _secret_file(lay.service_password_file, secrets.token_urlsafe(24))
        broker = lay.broker(ports["mqtt"])
        database = lay.database(ports["postgres"])
        settings = dataclasses.replace(
            settings,
            database_url=env["CHARGESHARE_DATABASE_URL"],
            broker_dir=broker.directory,
            broker_pid_file=broker.pid_file,
        )

        if before.postgres is None:
            localstack.start_postgres(database)
        if before.broker is None:
            # A stale pid file would make the ACL reload signal some unrelated process.
            broker.pid_file.unlink(missing_ok=True)
        brokeradmin.BrokerFiles(broker.directory, broker.pid_file).ensure()
        applied = asyncio.run(_prepare(settings, service_password))
        if before.broker is None:
            localstack.start_broker(broker)  # runs on in its own session after we exit
        write_env(lay, env)
        if not no_service and before.service is None:
            try:
                start_service(lay, settings, env, ports)
            except localstack.StackError as exc:
                raise localstack.StackError(
                    f"{exc}\n(broker and Postgres still run: `chargeshare stack down` stops them)"
                ) from None

        if as_json:
            typer.echo(json.dumps(env))
        else:
            if applied:
                typer.echo(f"applied migrations: {', '.join(applied)}")
            typer.echo(
                f"stack up: mqtt 127.0.0.1:{ports['mqtt']}, postgres {database.url()}"
                + ("" if no_service else f", api {env['CHARGESHARE_API_URL']}")
            )
            typer.echo(f"settings in {lay.env_file} (source it to use the CLI)")


@app.command("down")
def down() -> None:
    """Stop the service, the broker and Postgres; their data stays under .run/."""
    with _failing():
        lay = layout(Settings.from_env())
        ports = load_ports(lay)
        now = running(lay, ports)
        stopped = []
        if now.service is not None:
            _stop(now.service)
            stopped.append("service")
        lay.service_pid_file.unlink(missing_ok=True)
        broker = lay.broker(ports.get("mqtt", 0))
        if now.broker is not None:
            _stop(now.broker)  # the broker writes its persistence file on SIGTERM
            stopped.append("broker")
        broker.pid_file.unlink(missing_ok=True)
        if now.postgres is not None:
            localstack.stop_postgres(lay.database(ports.get("postgres", 0)))
            stopped.append("postgres")
        typer.echo(f"stopped {', '.join(stopped)}" if stopped else "stack is not running")


@app.command("status")
def status() -> None:
    """Show what runs; exit status 0 when broker, Postgres and service all run, else 3."""
    with _failing():
        lay = layout(Settings.from_env())
        ports = load_ports(lay)
        now = running(lay, ports)
        rows = [
            ("broker", now.broker, f"mqtt 127.0.0.1:{ports.get('mqtt', '-')}"),
            ("postgres", now.postgres, f"127.0.0.1:{ports.get('postgres', '-')}"),
            ("service", now.service, f"api http://127.0.0.1:{ports.get('api', '-')}"),
        ]
        for name, pid, where in rows:
            state = f"running (pid {pid})" if pid is not None else "stopped"
            typer.echo(f"{name:9} {state:22} {where}")
    if any(pid is None for _, pid, _ in rows):
        raise typer.Exit(3)
