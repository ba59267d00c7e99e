"""Send pushes through Firebase Cloud Messaging (firebase-admin's async path)."""

from __future__ import annotations

import asyncio
import itertools
import warnings
from typing import Any

import firebase_admin
import requests
from firebase_admin import credentials, messaging
from firebase_admin import exceptions as fcm_errors
from google.auth.transport import requests as google_requests

from service import errors
from service.adapters.notices import (
    TITLE,
    DeadToken,
    Notice,
    Rejected,
    SendResult,
    Sent,
    Unavailable,
    retry_after,
)

_app_names = itertools.count(1)


# --- FCM -------------------------------------------------------------------------------------


class _TimedRequest(google_requests.Request):
    """google-auth's transport with a bounded timeout (its default is 120 s)."""

    def __init__(self, session: requests.Session, timeout_s: float) -> None:
        super().__init__(session)
        self._timeout_s = timeout_s

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return super().__call__(  # type: ignore[no-untyped-call]
            url, method, body, headers, timeout or self._timeout_s, **kwargs
        )


class FcmSender:
    """Send through FCM HTTP v1 with firebase-admin's async path, one App per sender."""

    platform = "fcm"

    def __init__(
        self, credentials_file: str, *, base_url: str | None = None, timeout_s: float = 10.0
    ) -> None:
        try:
            cert = credentials.Certificate(credentials_file)
        except (OSError, ValueError) as exc:
            raise errors.ConfigError(
                "CHARGESHARE_FCM_CREDENTIALS", f"not a usable service-account JSON file: {exc}"
            ) from None
        self._timeout_s = timeout_s
        self._app = firebase_admin.initialize_app(
            cert, options={"httpTimeout": timeout_s}, name=f"chargeshare-push-{next(_app_names)}"
        )
        # firebase-admin has no endpoint option. Its messaging service is created once per App
        # and formats its URL then, so point it at `base_url` here, before any send (libs.md §3).
        try:
            self._service = messaging._get_messaging_service(self._app)
        except ValueError as exc:  # no project id in the credential
            firebase_admin.delete_app(self._app)
            raise errors.ConfigError("CHARGESHARE_FCM_CREDENTIALS", str(exc)) from None
        if base_url:
            self._service._fcm_url = (
                f"{base_url.rstrip('/')}/v1/projects/{cert.project_id}/messages:send"
            )
        self._credential = cert.get_credential()
        self._refresh_lock = asyncio.Lock()

    def message(self, token: str, notice: Notice) -> messaging.Message:
        """Build the FCM message: a notification plus data {request_id, kind}."""
        with warnings.catch_warnings():
            # FCM v1 addresses an app by its registration token, which is what the apps send
            # us; firebase-admin 7 flags Message.token in favour of installation ids.
            warnings.simplefilter("ignore", DeprecationWarning)
            return messaging.Message(
                token=token,
                notification=messaging.Notification(title=TITLE, body=notice.text),
                data={"request_id": notice.request_id, "kind": notice.kind},
                android=messaging.AndroidConfig(
                    priority="high",
                    notification=messaging.AndroidNotification(tag=notice.collapse_id),
                ),
                apns=messaging.APNSConfig(headers={"apns-collapse-id": notice.collapse_id}),
            )

    async def _ensure_access_token(self) -> None:
        # google-auth refreshes synchronously inside the send (libs.md pitfall 18): do it here,
        # in a thread, so a slow token endpoint never stalls the event loop.
        if self._credential.valid:
            return
        async with self._refresh_lock:
            if not self._credential.valid:
                await asyncio.to_thread(self._refresh)

    def _refresh(self) -> None:
        with requests.Session() as session:
            self._credential.refresh(_TimedRequest(session, self._timeout_s))

    async def send(self, token: str, sandbox: bool, notice: Notice) -> SendResult:
        """Send one notice; `sandbox` means nothing to FCM."""
        try:
            await self._ensure_access_token()
        except Exception as exc:  # google-auth's own errors and requests' transport errors
            return Unavailable(f"fcm: no access token: {type(exc).__name__}: {exc}")
        try:
            msg = self.message(token, notice)
        except ValueError as exc:
            return Rejected(f"fcm: {exc}")
        try:
            batch = await messaging.send_each_async([msg], app=self._app)
        except fcm_errors.FirebaseError as exc:
            return fcm_failure(exc)
        resp = batch.responses[0]
        if resp.success:
            return Sent(resp.message_id or "")
        return fcm_failure(resp.exception)

    async def aclose(self) -> None:
        """Close the HTTP client and delete the App."""
        # delete_app closes the service with asyncio.run(), which cannot run inside a loop:
        # close the async client here, then delete the App in a thread, where that is a no-op.
        await self._service._async_client.aclose()
        await asyncio.to_thread(firebase_admin.delete_app, self._app)


def fcm_failure(exc: BaseException | None) -> SendResult:
    """Classify an FCM error: dead token, refused message, or try again (and when)."""
    if exc is None:
        return Unavailable("fcm: failed without an error")
    reason = f"fcm {type(exc).__name__}: {exc}"
    # INVALID_ARGUMENT also covers a malformed message, but ours are fixed and small: per
    # Firebase's token-management guidance it means the token is not a valid one.
    if isinstance(
        exc,
        messaging.UnregisteredError
        | messaging.SenderIdMismatchError
        | fcm_errors.InvalidArgumentError,
    ):
        return DeadToken(reason)
    response = getattr(exc, "http_response", None)
    after = retry_after(response.headers.get("Retry-After")) if response is not None else None
    if isinstance(exc, messaging.QuotaExceededError):
        return Unavailable(reason, after, platform_down=False)
    # UNAVAILABLE, INTERNAL, timeouts, and credentials FCM refused: the service, not the token.
    return Unavailable(reason, after)
