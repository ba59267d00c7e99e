"""The broker's connection capacity: many idle MQTT 3.1.1 sessions, each one vehicle's login.

Raw asyncio sockets (no client library) send CONNECT and read CONNACK, in waves, until the
target is reached or the broker or this process refuses more. The broker's RSS is read at each
step, and a publish → subscribe round trip checks that it still serves traffic.
"""

from __future__ import annotations

import asyncio
import resource
import struct
import time
from dataclasses import dataclass, field

import gmqtt

from bench.load import connect
from bench.stack import memory_kb


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, user: str, password: str, keepalive: int = 0) -> bytes:
    """Build an MQTT 3.1.1 CONNECT (clean session, username and password)."""
    body = _string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", keepalive)
    body += _string(client_id) + _string(user) + _string(password)
    return bytes([0x10]) + _remaining(len(body)) + body


@dataclass
class Capacity:
    """How far the connection ramp got."""

    target: int
    reached: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    steps: list[tuple[int, float, int]] = field(default_factory=list)  # (conns, s, broker KiB)
    roundtrip_ms: float | None = None
    fd_limit: int = 0

    @property
    def per_s(self) -> float:
        return self.reached / self.seconds if self.seconds else 0.0


async def _one(port: int, cid: str, user: str, password: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(cid, user, password))
    ack = await asyncio.wait_for(reader.readexactly(4), 10)
    if ack[0] != 0x20 or ack[3] != 0:
        writer.close()
        raise ConnectionRefusedError(f"CONNACK return code {ack[3]}")
    return writer


async def roundtrip(port: int, user: str, password: str) -> float:
    """Return the ms from publish to receipt of one QoS 1 message through the broker."""
    got: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def on_message(*_: object) -> int:
        if not got.done():
            got.set_result(time.monotonic())
        return 0

    sub = await connect("bench-rt-sub", port, user, password)
    pub = await connect("bench-rt-pub", port, user, password)
    topic = f"ovms/{user}/RT/metric/v/c/state"
    sub.on_message = on_message
    sub.subscribe(gmqtt.Subscription(topic, qos=1))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    pub.publish(topic, b"charging", qos=1)
    t1 = await asyncio.wait_for(got, 10)
    await sub.disconnect()
    await pub.disconnect()
    return (t1 - t0) * 1000


async def capacity(
    port: int, user: str, password: str, broker_pid: int, target: int, wave: int = 250
) -> Capacity:
    """Open up to `target` idle connections; measure the rate, broker memory and a round trip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = Capacity(target, fd_limit=hard)
    writers: list[asyncio.StreamWriter] = []
    result.steps.append((0, 0.0, memory_kb(broker_pid, "VmRSS")))
    t0 = time.monotonic()
    next_step = 1000
    try:
        while len(writers) < target:
            n = min(wave, target - len(writers))
            base = len(writers)
            got = await asyncio.gather(
                *(_one(port, f"CAP{base + i:06d}", user, password) for i in range(n)),
                return_exceptions=True,
            )
            ok = [w for w in got if isinstance(w, asyncio.StreamWriter)]
            writers += ok
            if len(ok) < n:
                err = next(e for e in got if isinstance(e, BaseException))
                result.stopped_by = f"{type(err).__name__}: {err}"
                break
            if len(writers) >= next_step or len(writers) == target:
                result.steps.append(
                    (len(writers), time.monotonic() - t0, memory_kb(broker_pid, "VmRSS"))
                )
                next_step += 1000
        result.seconds = time.monotonic() - t0
        result.reached = len(writers)
        if not result.stopped_by:
            result.stopped_by = "target reached"
        try:
            result.roundtrip_ms = await roundtrip(port, user, password)
        except (OSError, TimeoutError, gmqtt.mqtt.handler.MQTTConnectError) as exc:
            result.stopped_by += f"; round trip failed: {exc}"
    finally:
        for w in writers:
            w.close()
        await asyncio.sleep(0.5)
    return result
