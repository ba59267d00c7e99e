"""Frozen settings read once from CHARGESHARE_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service import errors


def _secret(env: Mapping[str, str], name: str) -> bytes | None:
    """Read a secret from CHARGESHARE_<name> or the file named by CHARGESHARE_<name>_FILE."""
    value = env.get(f"CHARGESHARE_{name}")
    path = env.get(f"CHARGESHARE_{name}_FILE")
    if value:
        return value.encode()
    if path:
        try:
            data = Path(path).read_bytes().strip()
        except OSError as exc:
            raise errors.ConfigError(
                f"CHARGESHARE_{name}_FILE", f"cannot read {path}: {exc}"
            ) from None
        return data or None
    return None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service can be told; see the README's settings table."""

    database_url: str = "postgresql://chargeshare@127.0.0.1:5432/chargeshare"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str = "chargeshare-service"
    mqtt_password: str = ""
    mqtt_tls_ca: str | None = None
    client_id: str = "chargeshare-1"
    share_group: str = "chargeshare"
    session_expiry_s: int = 3600
    location_secret: bytes = b""
    location_secret_previous: bytes | None = None
    fence_radius_m: float = 75.0
    settle_s: float = 0.5
    question_ttl_s: int = 7 * 86400
    unshared_retention_days: int = 365
    license: str = "CC0-1.0"
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_rate_per_s: float = 10.0
    api_burst: int = 50
    webhook_allow_http_loopback: bool = False
    webhook_timeout_s: float = 10.0
    webhook_max_age_s: int = 48 * 3600
    webhook_partner_inflight: int = 4  # deliveries at once to one partner: a slow one waits alone
    fcm_credentials: str | None = None
    fcm_url: str | None = None
    apns_key_file: str | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_topic: str | None = None
    apns_url: str | None = None  # e.g. https://localhost:8443: a local APNs stand-in
    apns_ca_file: str | None = None  # CA bundle to trust for APNs (a stand-in's own certificate)
    push_timeout_s: float = 10.0
    push_platform_inflight: int = 8  # sends at once to one of FCM / APNs: a slow one waits alone
    owner_message_rate: float = 50.0  # inbound MQTT messages per second per owner (per replica)
    owner_message_burst: int = 5000  # a reconnect flushes every metric and queued grid logs
    owner_rate_notice_s: float = 60.0  # at most one rate_limited error per owner this often
    metrics_sample_s: float = 15.0  # how often database gauges (sessions, outbox) are refreshed
    broker_dir: Path | None = None  # where passwd/acl live, for `owner add` and `partner add`
    broker_pid_file: Path | None = None
    stack_dir: Path | None = None  # state of `chargeshare stack` (default: <repo>/.run)
    log_json: bool | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from the environment; raise ConfigError on a bad value."""
        env = os.environ if env is None else env
        get = env.get

        def num(name: str, default: float, kind: type = float) -> float:
            raw = get(f"CHARGESHARE_{name}")
            if raw is None or raw == "":
                return default
            try:
                return kind(raw)  # type: ignore[no-any-return]
            except ValueError:
                raise errors.ConfigError(f"CHARGESHARE_{name}", f"not a number: {raw!r}") from None

        def flag(name: str, default: bool) -> bool:
            raw = get(f"CHARGESHARE_{name}")
            if raw is None or raw == "":
                return default
            return raw.lower() in ("1", "true", "yes", "on")

        def opt_path(name: str) -> Path | None:
            raw = get(f"CHARGESHARE_{name}")
            return Path(raw) if raw else None

        d = cls()
        log_json = get("CHARGESHARE_LOG_JSON")
        return cls(
            database_url=get("CHARGESHARE_DATABASE_URL", d.database_url),
            mqtt_host=get("CHARGESHARE_MQTT_HOST", d.mqtt_host),
            mqtt_port=int(num("MQTT_PORT", d.mqtt_port, int)),
            mqtt_username=get("CHARGESHARE_MQTT_USERNAME", d.mqtt_username),
            mqtt_password=get("CHARGESHARE_MQTT_PASSWORD", d.mqtt_password),
            mqtt_tls_ca=get("CHARGESHARE_MQTT_TLS_CA") or None,
            client_id=get("CHARGESHARE_CLIENT_ID", d.client_id),
            share_group=get("CHARGESHARE_SHARE_GROUP", d.share_group),
            session_expiry_s=int(num("SESSION_EXPIRY_S", d.session_expiry_s, int)),
            location_secret=_secret(env, "LOCATION_SECRET") or b"",
            location_secret_previous=_secret(env, "LOCATION_SECRET_PREVIOUS"),
            fence_radius_m=num("FENCE_RADIUS_M", d.fence_radius_m),
            settle_s=num("SETTLE_S", d.settle_s),
            question_ttl_s=int(num("QUESTION_TTL_S", d.question_ttl_s, int)),
            unshared_retention_days=int(
                num("UNSHARED_RETENTION_DAYS", d.unshared_retention_days, int)
            ),
            license=get("CHARGESHARE_LICENSE", d.license),
            api_host=get("CHARGESHARE_API_HOST", d.api_host),
            api_port=int(num("API_PORT", d.api_port, int)),
            api_rate_per_s=num("API_RATE_PER_S", d.api_rate_per_s),
            api_burst=int(num("API_BURST", d.api_burst, int)),
            webhook_allow_http_loopback=flag("WEBHOOK_ALLOW_HTTP_LOOPBACK", False),
            webhook_timeout_s=num("WEBHOOK_TIMEOUT_S", d.webhook_timeout_s),
            webhook_max_age_s=int(num("WEBHOOK_MAX_AGE_S", d.webhook_max_age_s, int)),
            webhook_partner_inflight=int(
                num("WEBHOOK_PARTNER_INFLIGHT", d.webhook_partner_inflight, int)
            ),
            fcm_credentials=get("CHARGESHARE_FCM_CREDENTIALS") or None,
            fcm_url=get("CHARGESHARE_FCM_URL") or None,
            apns_key_file=get("CHARGESHARE_APNS_KEY_FILE") or None,
            apns_key_id=get("CHARGESHARE_APNS_KEY_ID") or None,
            apns_team_id=get("CHARGESHARE_APNS_TEAM_ID") or None,
            apns_topic=get("CHARGESHARE_APNS_TOPIC") or None,
            apns_url=get("CHARGESHARE_APNS_URL") or None,
            apns_ca_file=get("CHARGESHARE_APNS_CA_FILE") or None,
            push_timeout_s=num("PUSH_TIMEOUT_S", d.push_timeout_s),
            push_platform_inflight=int(
                num("PUSH_PLATFORM_INFLIGHT", d.push_platform_inflight, int)
            ),
            owner_message_rate=num("OWNER_MESSAGE_RATE", d.owner_message_rate),
            owner_message_burst=int(num("OWNER_MESSAGE_BURST", d.owner_message_burst, int)),
            owner_rate_notice_s=num("OWNER_RATE_NOTICE_S", d.owner_rate_notice_s),
            metrics_sample_s=num("METRICS_SAMPLE_S", d.metrics_sample_s),
            broker_dir=opt_path("BROKER_DIR"),
            broker_pid_file=opt_path("BROKER_PID_FILE"),
            stack_dir=opt_path("STACK_DIR"),
            log_json=None if not log_json else log_json.lower() in ("1", "true", "yes"),
        )

    def location_keys(self) -> list[bytes]:
        """Return the keys lookups accept: the current one first, then the previous one."""
        keys = [self.require_secret()]
        if self.location_secret_previous:
            keys.append(self.location_secret_previous)
        return keys

    def require_secret(self) -> bytes:
        """Return the location secret, or raise ConfigError saying how to set it."""
        if len(self.location_secret) < 16:
            raise errors.ConfigError(
                "CHARGESHARE_LOCATION_SECRET",
                "the location hashing secret is missing or shorter than 16 bytes; set "
                "CHARGESHARE_LOCATION_SECRET or CHARGESHARE_LOCATION_SECRET_FILE "
                "(keep it outside the database)",
            )
        return self.location_secret
