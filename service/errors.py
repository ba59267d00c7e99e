"""The service's errors.

ChargeShareError
├── ConfigError            a setting is missing or malformed
├── InvalidWebhookUrl      a partner webhook URL breaks the rules (https, loopback http)
├── InputError             a message from outside is rejected (carries the wire error code)
│   ├── InvalidTopic
│   ├── InvalidPayload
│   ├── UnknownVehicle
│   ├── UnknownRequest
│   ├── InvalidChoice
│   ├── AlreadyAnswered
│   └── RateLimited        an owner sent more than its share of messages
├── StoreError             the database refused or is unreachable
│   ├── AlreadyExists      a name that must be unique is taken
│   └── NotFound           a named account or record does not exist
└── BrokerAdminError       the broker's password or ACL file could not be changed
"""

from __future__ import annotations


class ChargeShareError(Exception):
    """Base of every error the service raises on purpose."""


class ConfigError(ChargeShareError):
    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"{setting}: {reason}")


class InvalidWebhookUrl(ChargeShareError):
    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"webhook URL {url!r} refused: {reason}")


class InputError(ChargeShareError):
    code = "invalid_payload"

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"{self.code}: {reason} ({topic})")


class InvalidTopic(InputError):
    code = "invalid_topic"


class InvalidPayload(InputError):
    code = "invalid_payload"


class UnknownVehicle(InputError):
    code = "unknown_vehicle"


class UnknownRequest(InputError):
    code = "unknown_request"


class InvalidChoice(InputError):
    code = "invalid_choice"


class AlreadyAnswered(InputError):
    code = "already_answered"


class RateLimited(InputError):
    code = "rate_limited"


class StoreError(ChargeShareError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class AlreadyExists(StoreError):
    def __init__(self, what: str, name: str) -> None:
        self.what = what
        self.name = name
        super().__init__(f"{what} {name!r} already exists")


class NotFound(StoreError):
    def __init__(self, what: str, name: str) -> None:
        self.what = what
        self.name = name
        super().__init__(f"no {what} named {name!r}")


class BrokerAdminError(ChargeShareError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _transient() -> tuple[type[BaseException], ...]:
    import asyncpg  # the one driver import here: the tuple names its exception types

    return (
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
        asyncpg.SerializationError,
        asyncpg.DeadlockDetectedError,
        asyncpg.AdminShutdownError,
        # A pooled connection the server cut while it was idle fails its next use this way
        # ("cannot switch to state …; another operation (2) is in progress"); the pool then
        # replaces it, so a retry succeeds.
        asyncpg.InternalClientError,
    )


# Errors that mean "the database is not reachable right now": retry, do not ack.
TRANSIENT = _transient()
