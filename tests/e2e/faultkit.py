"""A stack of its own for fault tests: broker, Postgres, service replicas as real processes.

Everything here can be broken on purpose: the broker and the Postgres cluster belong to one test
(restarted without disturbing other tests), each replica is a `chargeshare serve` process writing
JSON logs to its own file, and the partner's webhook receiver can refuse connections for a while.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from service import brokeradmin, localstack
from tests.conftest import SERVICE_PASSWORD, SERVICE_USER

REPO = localstack.REPO
CHARGESHARE = REPO / ".venv" / "bin" / "chargeshare"
HEALTH_TIMEOUT_S = 30.0


def _as_db_user(cmd: list[str]) -> list[str]:
    # pg_ctl refuses to run as root; Debian's package brings the `postgres` user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1.0) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


# ---- the service replicas ------------------------------------------------------------------------


@dataclass
class Replica:
    """One `chargeshare serve` process (restartable with the same identity and log file)."""

    name: str
    client_id: str
    api_port: int
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, *, wait: bool = True) -> None:
        """Start the process (appending to its log); wait until /healthz answers."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(CHARGESHARE), "serve"],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        assert self.proc is not None
        while not _healthy(self.api_port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.name} not healthy; see {self.log}")
            time.sleep(0.1)

    def kill(self) -> None:
        """Kill the process with SIGKILL (no shutdown at all) and reap it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """Stop the process with SIGTERM (SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def records(self) -> list[dict[str, Any]]:
        """Return the JSON log records written so far (other lines are skipped)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    found.append(rec)
        return found


# ---- the stack -----------------------------------------------------------------------------------


@dataclass
class Stack:
    """A broker, a Postgres cluster and service replicas that only this test uses."""

    root: Path
    broker: localstack.Broker
    database: localstack.Database
    secret_file: Path
    share_group: str
    broker_proc: subprocess.Popen[bytes] | None = None
    replicas: dict[str, Replica] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.database.url()

    def cli_env(self) -> dict[str, str]:
        """Environment of `chargeshare` commands against this stack."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("CHARGESHARE_")}
        return {
            **base,
            "CHARGESHARE_DATABASE_URL": self.database_url,
            "CHARGESHARE_BROKER_DIR": str(self.broker.directory),
            "CHARGESHARE_BROKER_PID_FILE": str(self.broker.pid_file),
            "CHARGESHARE_LOCATION_SECRET_FILE": str(self.secret_file),
            "CHARGESHARE_MQTT_USERNAME": SERVICE_USER,
            "CHARGESHARE_WEBHOOK_ALLOW_HTTP_LOOPBACK": "1",
        }

    def cli(self, *args: str) -> dict[str, Any]:
        """Run `chargeshare ARGS --json` and return its JSON answer."""
        done = subprocess.run(
            [str(CHARGESHARE), *args, "--json"],
            env=self.cli_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"chargeshare {' '.join(args)}: {done.stderr.strip()}")
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer

    def add_replica(self, name: str, **extra_env: str) -> Replica:
        """Describe a replica (own client id and API port, the stack's share group)."""
        env = {
            **self.cli_env(),
            "CHARGESHARE_MQTT_HOST": "127.0.0.1",
            "CHARGESHARE_MQTT_PORT": str(self.broker.port),
            "CHARGESHARE_MQTT_PASSWORD": SERVICE_PASSWORD,
            "CHARGESHARE_CLIENT_ID": f"faults-{name}",
            "CHARGESHARE_SHARE_GROUP": self.share_group,
            "CHARGESHARE_API_PORT": str(localstack.free_port()),
            "CHARGESHARE_LOG_JSON": "1",
            "CHARGESHARE_SESSION_EXPIRY_S": "600",
            **extra_env,
        }
        r = Replica(
            name=name,
            client_id=env["CHARGESHARE_CLIENT_ID"],
            api_port=int(env["CHARGESHARE_API_PORT"]),
            log=self.root / f"replica-{name}.log",
            env=env,
        )
        self.replicas[name] = r
        return r

    # ---- faults --------------------------------------------------------------------------------

    def start_broker(self) -> None:
        self.broker_proc = localstack.start_broker(self.broker)

    def stop_broker(self) -> None:
        """Stop the broker (it saves its sessions and retained messages) and wait for its exit."""
        assert self.broker_proc is not None
        localstack.stop_broker(self.broker_proc)

    def restart_broker(self) -> None:
        """Stop the broker, wait for the old process to exit, start it again on the same port."""
        self.stop_broker()
        self.start_broker()

    def restart_postgres(self) -> None:
        """`pg_ctl restart -m fast` of this stack's cluster."""
        restart_postgres(self.database)


def restart_postgres(database: localstack.Database) -> None:
    """`pg_ctl restart -m fast`: every connection is cut, the cluster comes back."""
    done = subprocess.run(
        _as_db_user(
            [
                str(localstack.pg_bindir() / "pg_ctl"),
                "-D",
                str(database.data),
                "-l",
                str(database.directory / "postgres.log"),
                "-m",
                "fast",
                "-w",
                "restart",
            ]
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed: {done.stdout}{done.stderr}")


@contextlib.contextmanager
def cluster() -> Iterator[localstack.Database]:
    """Start a Postgres cluster of its own (database `chargeshare`, not migrated); stop it after."""
    # Not under pytest's 0700 directory: the cluster runs as user postgres when we are root.
    pg_dir = Path(tempfile.mkdtemp(prefix="chargeshare-faults-pg-"))
    db = localstack.Database(pg_dir, localstack.free_port())
    try:
        localstack.start_postgres(db, fsync=False)
        yield db
    finally:
        localstack.stop_postgres(db, mode="immediate")
        shutil.rmtree(pg_dir, ignore_errors=True)


@contextlib.contextmanager
def stack(root: Path) -> Iterator[Stack]:
    """Start a broker and a Postgres cluster of its own; stop replicas, broker and cluster after."""
    with cluster() as db, _stack(root, db) as s:
        yield s


@contextlib.contextmanager
def _stack(root: Path, db: localstack.Database) -> Iterator[Stack]:
    b = localstack.Broker(directory=root / "broker", port=localstack.free_port())
    secret_file = root / "location.secret"
    secret_file.write_text(secrets.token_hex(32) + "\n")
    secret_file.chmod(0o600)
    s = Stack(root, b, db, secret_file, share_group=f"faults{secrets.token_hex(3)}")
    try:
        files = brokeradmin.BrokerFiles(b.directory, b.pid_file)
        b.directory.mkdir(parents=True, exist_ok=True)
        files.set_password(SERVICE_USER, SERVICE_PASSWORD)
        files.write_acl(SERVICE_USER, [], [])
        s.start_broker()
        subprocess.run(
            [str(CHARGESHARE), "migrate"],
            env=s.cli_env(),
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        yield s
    finally:
        for r in s.replicas.values():
            r.stop()
        if s.broker_proc is not None:
            localstack.stop_broker(s.broker_proc)


# ---- the partner's webhook receiver --------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """One request the receiver answered."""

    headers: dict[str, str]
    body: bytes


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Verify a Standard Webhooks v1 signature, written from the spec, not from the service."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    for part in headers.get("webhook-signature", "").split():
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(sig), expected):
            return True
    return False


class WebhookReceiver:
    """An HTTP/1.1 server on a fixed loopback port that can go down and come back."""

    path = "/hooks/faults"

    def __init__(self) -> None:
        self.port = localstack.free_port()
        self.hooks: list[Hook] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(n)
                if len(body) < n:
                    # The sender went away mid-request (a replica killed while posting): it saw
                    # no 2xx and will deliver again; a real receiver drops the torn request.
                    self.close_connection = True
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.hooks.append(Hook(headers, body))
                self.send_response(204)
                self.send_header("content-length", "0")
                self.send_header("connection", "close")  # every delivery opens a connection
                self.end_headers()
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def up(self) -> None:
        """Listen (again) on the same port."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: connections are refused until `up()`."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def received(self) -> list[Hook]:
        with self._lock:
            return list(self.hooks)
