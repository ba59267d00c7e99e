"""What the containers of docker/compose.yaml run, run here without Docker.

Container paths and host names are mapped to local ones (bind mounts to the repository, named
volumes to temporary directories, `mosquitto` / `postgres` to this test's servers); everything
else is taken from the compose file and the Dockerfile as written.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from service import localstack
from tests.conftest import REPO
from tests.integration.test_tls import Pki, make_pki

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
WAIT_S = 60.0  # liveness guard only: every wait ends on a server's answer

# What an operator puts in docker/.env.
DOTENV = {
    "POSTGRES_PASSWORD": "pg-" + secrets.token_hex(8),
    "CHARGESHARE_MQTT_PASSWORD": "mqtt-" + secrets.token_hex(8),
    "CHARGESHARE_LOCATION_SECRET": secrets.token_hex(32),
}

_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Expand ${VAR}, ${VAR:-default} and ${VAR:?error} as docker compose does."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        got = env.get(name, "")
        if got:
            return got
        if op == ":?":
            raise AssertionError(f"compose requires {name}: {arg}")
        return arg if op == ":-" else ""

    return _VAR.sub(one, value)


def compose() -> dict[str, Any]:
    """Load docker/compose.yaml (YAML anchors and merge keys resolved)."""
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def environment(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """Return a service's environment with compose's interpolation applied."""
    raw = service.get("environment", {})
    assert isinstance(raw, dict), "environment as a mapping"
    return {k: interpolate(str(v), env) for k, v in raw.items()}


def mounts(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """Map container path -> source (a path relative to docker/, or a named volume)."""
    out = {}
    for spec in service.get("volumes", []):
        parts = interpolate(spec, env).split(":")
        out[parts[1]] = parts[0]
    return out


def dockerfile() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (INSTRUCTION, arguments), continuations joined."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None = None) -> bytes:
    """GET the URL until it answers 200; return the body."""
    deadline = time.monotonic() + WAIT_S
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return bytes(r.read())
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, f"{url} never answered 200"
        time.sleep(0.1)


# ---- the files themselves ----------------------------------------------------------------------


def test_compose_runs_broker_database_and_service_with_health_checks() -> None:
    """Every container of the compose file has a health check; state lives in named volumes."""
    doc = compose()
    services = doc["services"]
    assert {"mosquitto", "postgres", "service"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], name
        for spec in svc.get("volumes", []):
            source = interpolate(spec, {}).split(":")[0]
            if source.startswith("."):
                if "CHARGESHARE_TLS_DIR" in spec:
                    continue  # the operator's certificates
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in doc["volumes"], f"{name}: volume {source} not declared"
    assert mounts(services["mosquitto"], {})["/mosquitto/config"] == "../broker"
    assert services["service"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert services["service"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_requires_the_secrets() -> None:
    """Without the secrets of docker/.env the service's environment does not interpolate."""
    svc = compose()["services"]["service"]
    for name in DOTENV:
        partial = {k: v for k, v in DOTENV.items() if k != name}
        with pytest.raises(AssertionError, match=name):
            environment(svc, partial)


def test_replicas_have_distinct_client_ids_and_one_share_group() -> None:
    """Every service replica keeps its own MQTT session and joins the same shared subscription."""
    services = compose()["services"]
    replicas = [environment(s, DOTENV) for n, s in services.items() if n.startswith("service")]
    assert len(replicas) >= 2
    assert len({r["CHARGESHARE_CLIENT_ID"] for r in replicas}) == len(replicas)
    assert len({r["CHARGESHARE_SHARE_GROUP"] for r in replicas}) == 1


def test_dockerfile_copies_files_that_exist() -> None:
    """Each file the Dockerfile copies from the build context (the repository) exists."""
    copies = [args.split() for word, args in dockerfile() if word == "COPY"]
    assert copies
    for args in copies:
        if any(a.startswith("--from") for a in args):
            continue
        for source in args[:-1]:
            assert (REPO / source).exists(), source


def test_service_image_runs_as_the_broker_user() -> None:
    """The service image runs as uid 1883, the eclipse-mosquitto image's user."""
    users = [args for word, args in dockerfile() if word == "USER"]
    assert users[-1] == "1883:1883"


# ---- the broker container ----------------------------------------------------------------------


@dataclass
class ComposeBroker:
    """The broker container's command, run here on the compose file's configuration."""

    data: Path
    port: int
    tls_port: int
    pki: Pki
    proc: subprocess.Popen[bytes]
    env: dict[str, str]


def _local_broker_conf(directory: Path, paths: dict[str, Path], ports: dict[int, int]) -> Path:
    """Rewrite broker/mosquitto.conf: container paths to local ones, listeners to free ports."""
    text = (REPO / "broker" / "mosquitto.conf").read_text()
    for inside in sorted(paths, key=len, reverse=True):
        text = text.replace(inside, str(paths[inside]))
    for inside_port, port in ports.items():
        text = re.sub(rf"^listener {inside_port}$", f"listener {port} 127.0.0.1", text, flags=re.M)
    if os.geteuid() == 0:
        # The image starts as root and drops to `mosquitto`; here temp dirs are root's own.
        text = "user root\n" + text
    conf = directory / "mosquitto.conf"
    conf.write_text(text)
    return conf


@pytest.fixture(scope="module")
def compose_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeBroker]:
    """Run the mosquitto service's command with broker/ mounted as compose mounts it."""
    root = tmp_path_factory.mktemp("compose-broker")
    svc = compose()["services"]["mosquitto"]
    env = {"CHARGESHARE_TLS_DIR": str(root / "certs")}
    pki = make_pki(root / "certs")
    data = root / "data"
    data.mkdir()
    paths: dict[str, Path] = {}
    for inside, source in mounts(svc, env).items():
        if source.startswith((".", "/")):
            paths[inside] = (DOCKER / source).resolve()
        else:
            paths[inside] = data  # the named volume
    assert paths["/mosquitto/config"] == REPO / "broker"
    port, tls_port = localstack.free_port(), localstack.free_port()
    conf = _local_broker_conf(root, paths, {1883: port, 8883: tls_port})
    command = [str(a) for a in svc["command"]]
    script = paths[command[1]]
    run_env = {
        **os.environ,
        "MOSQUITTO_CONF": str(conf),
        "MOSQUITTO_DATA": str(data),
        "MOSQUITTO_PORT": str(port),
    }
    with open(root / "broker.out", "wb") as out:
        proc = subprocess.Popen(
            [command[0], str(script)], env=run_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        localstack.wait_port(port, proc=proc)
        localstack.wait_port(tls_port, proc=proc)
    except localstack.StackError:
        proc.kill()
        proc.wait()
        raise AssertionError((root / "broker.out").read_text()) from None
    yield ComposeBroker(data, port, tls_port, pki, proc, run_env)
    localstack.stop_broker(proc)


def test_broker_health_check_passes(compose_broker: ComposeBroker) -> None:
    """The broker container's health check logs in and exits 0 against the started broker."""
    svc = compose()["services"]["mosquitto"]
    test = [str(a) for a in svc["healthcheck"]["test"]]
    assert test[0] == "CMD"
    script = DOCKER / Path(test[2]).name
    done = subprocess.run(
        [test[1], str(script)], env=compose_broker.env, capture_output=True, timeout=WAIT_S
    )
    assert done.returncode == 0, done.stderr


def test_broker_serves_tls_with_the_mounted_certificates(compose_broker: ComposeBroker) -> None:
    """The TLS listener presents the mounted certificate; a login still needs a password."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tls-{secrets.token_hex(3)}")
    c.tls_set(ca_certs=str(compose_broker.pki.ca))
    codes: list[int] = []
    c.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc.value)
    c.connect("127.0.0.1", compose_broker.tls_port)
    deadline = time.monotonic() + WAIT_S
    while not codes and time.monotonic() < deadline:
        c.loop(timeout=0.1)
    c.disconnect()
    assert codes == [0x87]  # handshake done, then "not authorised": anonymous is refused


def test_broker_data_files_are_private(compose_broker: ComposeBroker) -> None:
    """The password file holds only hashes and neither it nor the ACL is readable by others."""
    for name in ("passwd", "acl", "healthcheck.password"):
        mode = (compose_broker.data / name).stat().st_mode & 0o777
        assert mode & 0o077 == 0, (name, oct(mode))
    password = (compose_broker.data / "healthcheck.password").read_text().strip()
    passwd = (compose_broker.data / "passwd").read_text()
    assert "chargeshare-healthcheck:$7$" in passwd and password not in passwd


# ---- the service container ---------------------------------------------------------------------


def _service_env(compose_broker: ComposeBroker, database_url: str, api_port: int) -> dict[str, str]:
    """The service container's environment, its host names and paths mapped to this test's."""
    svc = compose()["services"]["service"]
    env = environment(svc, DOTENV)
    assert env["CHARGESHARE_MQTT_HOST"] == "mosquitto" and env["CHARGESHARE_MQTT_PORT"] == "1883"
    env["CHARGESHARE_MQTT_HOST"] = "127.0.0.1"
    env["CHARGESHARE_MQTT_PORT"] = str(compose_broker.port)
    url = env["CHARGESHARE_DATABASE_URL"]
    prefix = f"postgresql://chargeshare:{DOTENV['POSTGRES_PASSWORD']}@postgres:5432/chargeshare"
    assert url == prefix
    local = database_url.removeprefix("postgresql://")  # chargeshare@127.0.0.1:port/db
    user, _, where = local.partition("@")
    env["CHARGESHARE_DATABASE_URL"] = f"postgresql://{user}:{DOTENV['POSTGRES_PASSWORD']}@{where}"
    volume_dir = mounts(svc, DOTENV)
    assert volume_dir == {"/broker": "broker-data"}  # the broker's data volume
    for key in ("CHARGESHARE_BROKER_DIR", "CHARGESHARE_BROKER_PID_FILE"):
        env[key] = env[key].replace("/broker", str(compose_broker.data), 1)
    assert env["CHARGESHARE_API_PORT"] == "8080"
    env["CHARGESHARE_API_PORT"] = str(api_port)
    env["CHARGESHARE_API_HOST"] = "127.0.0.1"  # the container binds 0.0.0.0; here loopback will do
    return env


def _image_command() -> list[str]:
    """Return ENTRYPOINT + CMD of the service image, with copied files mapped to the repo."""
    instructions = dockerfile()
    copied: dict[str, Path] = {}
    for word, args in instructions:
        parts = args.split()
        if word == "COPY" and not parts[0].startswith("--from"):
            copied[parts[-1]] = REPO / parts[0]
    entry = json.loads(next(a for w, a in reversed(instructions) if w == "ENTRYPOINT"))
    cmd = json.loads(next(a for w, a in reversed(instructions) if w == "CMD"))
    command = [str(copied.get(a, a)) for a in [*entry, *cmd]]
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def _publish(port: int, user: str, password: str, topic: str, body: str, retain: bool) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-app", protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, body, qos=1, retain=retain).wait_for_publish(WAIT_S)
    finally:
        c.disconnect()
        c.loop_stop()


def test_service_command_starts_with_the_compose_environment(
    compose_broker: ComposeBroker, database_url: str, tmp_path: Path
) -> None:
    """The image's command admits its broker login, serves /readyz and /metrics, logs JSON."""
    api_port = localstack.free_port()
    env = _service_env(compose_broker, database_url, api_port)
    run_env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            _image_command(), env=run_env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:
        base = f"http://127.0.0.1:{api_port}"
        _wait_http(base + "/readyz", proc)
        metrics = _wait_http(base + "/metrics", proc).decode()
        assert "chargeshare_replica_lag_seconds" in metrics

        # The compose health check, pointed at this port.
        check = [str(a) for a in compose()["services"]["service"]["healthcheck"]["test"]]
        check = [a.replace(":8080/", f":{api_port}/") for a in check[1:]]
        check[0] = sys.executable
        assert subprocess.run(check, capture_output=True, timeout=WAIT_S).returncode == 0

        # What the operator does with `docker compose exec service chargeshare owner add ...`.
        owner, password = f"own{secrets.token_hex(3)}", secrets.token_urlsafe(10)
        cli = Path(sys.executable).parent / "chargeshare"
        added = subprocess.run(
            [str(cli), "owner", "add", owner, "--password", password, "--json"],
            env=run_env, capture_output=True, text=True, timeout=WAIT_S,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        _publish(compose_broker.port, owner, password, f"ovms/{owner}/car1/chargeshare/optin",
                 '{"enabled": true, "nickname": "Jimbo"}', retain=True)  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        lines: list[dict[str, Any]] = []
        while not any(e.get("event") == "opt-in" for e in lines):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
            text = log.read_text()
            lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        optin = next(e for e in lines if e.get("event") == "opt-in")
        assert optin["vehicle"] == "car1" and optin["owner"] == owner
        # Every line the service wrote is one JSON object.
        for raw in log.read_text().splitlines():
            if raw.strip():
                assert isinstance(json.loads(raw), dict), raw
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert status == 0, log.read_text()[-3000:]


def test_entrypoint_passes_other_commands_to_the_cli(tmp_path: Path) -> None:
    """`docker compose run service partner list --help` runs the CLI without preparing anything."""
    command = _image_command()[:-1]  # without CMD's "serve"
    run_env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        [*command, "partner", "list", "--help"],
        env=run_env, capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "partner" in done.stdout.lower()


def test_env_example_names_every_required_variable() -> None:
    """docker/env.example lists each variable the compose file requires with ${VAR:?...}."""
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    listed = {
        line.split("=", 1)[0]
        for line in (DOCKER / "env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert required and required <= listed
