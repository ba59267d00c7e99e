"""Run the fake FCM and APNs servers, standalone or for tests, and show what phones would get.

    python -m service.testing.fake_push --fcm-port 8901 --apns-port 8902 --dir .run/fake-push

writes the credentials the service needs into the directory, prints the CHARGESHARE_* settings
that point the service at the fakes (also saved as `push.env` there), then prints one line per
notification received until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from service.testing import fake_apns, fake_fcm

T = TypeVar("T")


class _Fake(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Background:
    """An event loop in a thread of its own: the fakes answer even while the caller's loop waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-push", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the background loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@contextlib.contextmanager
def serve_in_thread(*fakes: _Fake) -> Iterator[Background]:
    """Start the fakes on a background loop; stop them on exit."""
    bg = Background()
    try:
        for f in fakes:
            bg.run(f.start())
        yield bg
    finally:
        for f in fakes:
            bg.run(f.stop())
        bg.close()


def settings_env(
    fcm: fake_fcm.FakeFcm, apns: fake_apns.FakeApns, directory: Path
) -> dict[str, str]:
    """Write the FCM credential; return the CHARGESHARE_* settings that use both fakes."""
    cred = fcm.write_credentials(directory / "fcm-service-account.json")
    return {
        "CHARGESHARE_FCM_CREDENTIALS": str(cred),
        "CHARGESHARE_FCM_URL": fcm.url,
        "CHARGESHARE_APNS_KEY_FILE": str(apns.key_file),
        "CHARGESHARE_APNS_KEY_ID": apns.key_id,
        "CHARGESHARE_APNS_TEAM_ID": apns.team_id,
        "CHARGESHARE_APNS_TOPIC": apns.topic,
        "CHARGESHARE_APNS_URL": apns.url,
        "CHARGESHARE_APNS_CA_FILE": str(apns.cert_file),
    }


def _line(platform: str, token: str, title: str, body: str, data: dict[str, Any]) -> str:
    return (
        f"{platform:4} {token[:12]}…  {title}: {body}  "
        f"(request {data.get('request_id')}, {data.get('kind')})"
    )


def _print_fcm(r: fake_fcm.Received, as_json: bool) -> None:
    note = r.message.get("notification", {})
    data = r.message.get("data", {})
    if as_json:
        print(json.dumps({"platform": "fcm", "token": r.token, **note, **data}), flush=True)
    else:
        print(_line("fcm", r.token, note.get("title", ""), note.get("body", ""), data), flush=True)


def _print_apns(r: fake_apns.Received, as_json: bool) -> None:
    alert = r.payload.get("aps", {}).get("alert", {})
    data = {k: v for k, v in r.payload.items() if k != "aps"}
    if as_json:
        print(json.dumps({"platform": "apns", "token": r.token, **alert, **data}), flush=True)
    else:
        line = _line("apns", r.token, alert.get("title", ""), alert.get("body", ""), data)
        print(line, flush=True)


async def _serve(
    fcm: fake_fcm.FakeFcm, apns: fake_apns.FakeApns, directory: Path, as_json: bool
) -> None:
    await fcm.start()
    await apns.start()
    env = settings_env(fcm, apns, directory)
    (directory / "push.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    for k, v in env.items():
        print(f"{k}={v}", file=sys.stderr if as_json else sys.stdout, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fcm.stop()
    await apns.stop()


def main(argv: list[str] | None = None) -> None:
    """Run both fakes until interrupted."""
    p = argparse.ArgumentParser(prog="python -m service.testing.fake_push", description=__doc__)
    p.add_argument("--fcm-port", type=int, default=0, help="FCM port (default: any free one)")
    p.add_argument("--apns-port", type=int, default=0, help="APNs port (default: any free one)")
    p.add_argument("--dir", help="where to write credentials and push.env (default: a temp dir)")
    p.add_argument("--apns-topic", default="org.openvehicles.chargeshare")
    p.add_argument("--json", action="store_true", help="one JSON object per notification")
    args = p.parse_args(argv)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="fake-push-")).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    fcm = fake_fcm.FakeFcm(port=args.fcm_port, on_notification=lambda r: _print_fcm(r, args.json))
    apns = fake_apns.FakeApns(
        directory,
        port=args.apns_port,
        topic=args.apns_topic,
        on_notification=lambda r: _print_apns(r, args.json),
    )
    asyncio.run(_serve(fcm, apns, directory, args.json))


if __name__ == "__main__":
    main()
