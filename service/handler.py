"""Inbound messages: validate, then load → apply → save in one transaction, output via the outbox.

The MQTT adapter acks a message only after `handle` returns, i.e. after the commit. A rejected
message is answered on `P chargeshare/error`, logged once, and acked: it must not come back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncpg
import pydantic
import structlog

from service import errors, gridlog, observability, outbox, sealing, topics, wire
from service.adapters import push_tokens, store
from service.config import Settings
from service.domain import detect, sessions
from service.effects import Ctx, clear_question, publish_status, run
from service.errors import TRANSIENT

log = structlog.get_logger("handler")

RETRY_CAP_S = 5.0  # longest wait between two attempts while the database is unreachable
PHASE_METRICS = frozenset({"v.c.charging", "v.c.state", "v.c.substate"})
TRACKED = frozenset({"v.c.kwh", "v.c.power", "v.c.voltage", "v.c.current", "v.b.soc", "v.c.type"})


@dataclasses.dataclass(frozen=True, slots=True)
class _Item:
    name: str
    value: str
    retained: bool
    since: datetime | None
    arrived: float  # event loop time when the message came in


@dataclasses.dataclass(slots=True)
class _Batch:
    """Metrics of one vehicle that wait for one transaction, and its outcome."""

    items: list[_Item]
    done: asyncio.Future[None]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Handler:
    """Turn each inbound message into committed state and queued output."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.secrets = settings.location_keys()
        self.wake = wake
        self.clock = clock
        self._waiting: dict[tuple[str, str], _Batch] = {}  # metrics not yet in a transaction
        self._busy: set[tuple[str, str]] = set()  # vehicles whose metrics are being applied
        self._recovering_until = 0.0  # event loop time until which a database outage is recent

    async def handle(
        self, topic: str, payload: bytes, *, retained: bool = False, since: datetime | None = None
    ) -> None:
        """Handle one message until committed; retry while the database is unreachable."""
        delay = 0.2
        while True:
            try:
                await self._handle_once(topic, payload, retained, since)
                return
            except TRANSIENT as exc:
                self._troubled()
                log.warning(
                    "database unavailable; message not acked yet", topic=topic, error=str(exc)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)

    async def _handle_once(
        self, topic: str, payload: bytes, retained: bool, since: datetime | None
    ) -> None:
        try:
            try:
                parsed = topics.parse(topic)
            except topics.TopicError as exc:
                raise errors.InvalidTopic(topic, exc.reason) from None
            await self._dispatch(parsed, topic, payload, retained, since)
        except errors.InputError as exc:
            await self.reject(topic, exc)
        except TRANSIENT:
            raise
        except Exception:
            # A bug must not crash ingest or block the queue: log it, tell the owner, ack.
            log.exception("message handling failed", topic=topic)
            await self.reject(
                topic, errors.InvalidPayload(topic, "the service could not handle it")
            )

    async def reject(self, topic: str, exc: errors.InputError) -> None:
        """Log a rejected message and queue the error for the owner's apps (when addressable)."""
        log.warning("message rejected", topic=topic, code=exc.code, reason=exc.reason)
        observability.rejected(exc.code)
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != topics.ROOT:
            return
        owner, vehicle = parts[1], parts[2]
        if not (topics.valid_name(owner) and topics.valid_name(vehicle)):
            return
        body = wire.Error(topic=topic[:512], error=exc.reason, code=exc.code)  # type: ignore[arg-type]
        async with self.pool.acquire() as conn:
            await outbox.enqueue(
                conn, "mqtt", body.model_dump_json().encode(), topic=topics.error(owner, vehicle)
            )
        self.wake()

    async def _dispatch(
        self,
        p: topics.Parsed,
        topic: str,
        payload: bytes,
        retained: bool,
        since: datetime | None,
    ) -> None:
        kind = p.kind
        if kind is topics.Kind.METRIC:
            await self.metric(p, topic, payload, retained, since)
        elif kind is topics.Kind.GRID_LOG:
            await self.grid_log(p, topic, payload)
        elif kind is topics.Kind.OPTIN:
            if not payload:
                return  # the app cleared its retained opt-in: nothing to do
            await self.optin(p, topic, _model(wire.OptIn, topic, payload))
        elif kind is topics.Kind.PUSH:
            await self.push(p, _model(wire.PushRegistration, topic, payload))
        elif kind is topics.Kind.DECISION:
            await self.decision(p, topic, _model(wire.Decision, topic, payload))
        else:
            # Events and notifications carry no data the metrics do not also carry.
            log.debug("event seen", topic=topic)

    # ---- metrics -------------------------------------------------------------------------------

    async def metric(
        self, p: topics.Parsed, topic: str, payload: bytes, retained: bool, since: datetime | None
    ) -> None:
        """Apply one metric; a vehicle's metrics that queue up meanwhile share one transaction."""
        name = p.name
        if name not in detect.KEPT_METRICS and name not in detect.POSITION_METRICS:
            return
        value = _text(topic, payload)
        reason = detect.valid_metric_value(name, value)
        if reason is not None:
            raise errors.InvalidPayload(topic, reason)
        # No await before the append: metrics join their vehicle's batch in arrival order.
        key = (p.owner, p.vehicle)
        loop = asyncio.get_running_loop()
        batch = self._waiting.get(key)
        if batch is None:
            batch = self._waiting[key] = _Batch([], loop.create_future())
        batch.items.append(_Item(name, value, retained, since, loop.time()))
        if key not in self._busy:
            self._busy.add(key)
            try:
                while (next_batch := self._waiting.pop(key, None)) is not None:
                    await self._apply_batch(key, next_batch)
            finally:
                self._busy.discard(key)
        await batch.done  # set by whichever message of this vehicle ran the batch

    async def _apply_batch(self, key: tuple[str, str], batch: _Batch) -> None:
        delay = 0.2
        while True:
            try:
                judging = await self._apply_metrics(key, batch.items)
                break
            except TRANSIENT as exc:
                self._troubled()
                log.warning(
                    "database unavailable; message not acked yet",
                    topic=topics.prefix(*key) + "metric/…",
                    metrics=len(batch.items),
                    error=str(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)
            except Exception as exc:  # each message of the batch reports it on its own
                batch.done.set_exception(exc)
                return
            except BaseException:  # cancelled: the waiting messages are not handled
                batch.done.cancel()
                raise
        batch.done.set_result(None)
        if judging:
            self.wake()

    async def _apply_metrics(self, key: tuple[str, str], items: list[_Item]) -> bool:
        """Apply a vehicle's metrics in order in one transaction; tell whether a judgment waits."""
        async with self.pool.acquire() as conn, conn.transaction():
            v = await store.lock_vehicle(conn, *key)
            now = self.clock()
            # A replica behind its inflow (a flood after a reconnect, retries while the
            # database restarts) waits twice that much longer before a judgment: the other
            # replicas, holding the rest of a burst, may be further behind still.
            clock = asyncio.get_running_loop().time()
            lag = max(0.0, clock - min(it.arrived for it in items))
            # Just after a database outage, other replicas may still sit in a retry delay
            # holding part of a burst: judge only once their longest delay has passed.
            recovering = RETRY_CAP_S if clock < self._recovering_until else 0.0
            settle = timedelta(seconds=self.settings.settle_s + 2 * lag + recovering)
            metrics = dict(v.metrics)
            position = v.position_enc
            judge_at, changed_at, metrics_at = v.judge_at, v.changed_at, v.metrics_at
            changed = live = tracked = False
            for it in items:
                if it.retained and it.since is not None and metrics_at is not None:
                    if metrics_at >= it.since:
                        continue  # a retained snapshot must not rewind what live metrics said
                if it.name in detect.POSITION_METRICS:
                    position = self._moved_from(v.salt, position, it.name, float(it.value))
                else:
                    if metrics.get(it.name) == it.value:
                        continue
                    metrics[it.name] = it.value
                    tracked = tracked or it.name in TRACKED
                changed = True
                if not it.retained:
                    live, metrics_at = True, now
                if detect.phase_of(metrics).value != v.phase:
                    if judge_at is None:
                        judge_at, changed_at = now + settle, now
                    elif it.name in PHASE_METRICS:
                        # The module sends state, substate and charging one by one: a burst
                        # that queues up is judged once its last phase metric is in.
                        judge_at = max(judge_at, now + settle)
            if not changed:
                return False
            await store.save_metrics(
                conn, v.pk, metrics, position, now, judge_at, changed_at, live=live
            )
            if tracked:
                r = detect.reading(metrics)
                await conn.execute(
                    store.TRACK,
                    v.pk,
                    r.energy_kwh,
                    r.power_kw,
                    r.voltage,
                    r.current,
                    r.soc,
                    r.connector,
                )
        return judge_at is not None

    def _troubled(self) -> None:
        """Note a database outage: judgments wait out the retry delays for a while."""
        self._recovering_until = asyncio.get_running_loop().time() + 2 * RETRY_CAP_S

    def _moved_from(
        self, salt: bytes, position_enc: bytes | None, name: str, value: float
    ) -> bytes:
        lat, lon = math.nan, math.nan
        if position_enc is not None:
            opened = sealing.open_position(self.secrets, salt, position_enc)
            if opened is not None:
                lat, lon = opened
        if name == "v.p.latitude":
            lat = value
        else:
            lon = value
        return sealing.seal_position(self.secrets[0], salt, lat, lon)

    async def grid_log(self, p: topics.Parsed, topic: str, payload: bytes) -> None:
        text = _text(topic, payload)
        try:
            rec = detect.parse_grid_record(text)
        except ValueError as exc:
            raise errors.InvalidPayload(topic, f"bad grid log record: {exc}") from None
        at = self.clock() + timedelta(seconds=p.age_s)
        async with self.pool.acquire() as conn, conn.transaction():
            v = await store.lock_vehicle(conn, p.owner, p.vehicle)
            ctx = Ctx(conn, self.settings, self.clock(), v)
            await gridlog.apply(ctx, self.secrets, rec, at)
            if ctx.status_dirty:
                await publish_status(ctx)
        self.wake()

    # ---- app topics ----------------------------------------------------------------------------

    async def optin(self, p: topics.Parsed, topic: str, m: wire.OptIn) -> None:
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            v = await store.lock_vehicle(conn, p.owner, p.vehicle)
            nickname = m.nickname if m.enabled else v.nickname
            await conn.execute(store.SET_OPTIN, v.pk, m.enabled, nickname, v.handle)
            v = dataclasses.replace(v, opted_in=m.enabled, nickname=nickname)
            ctx = Ctx(conn, self.settings, now, v)
            if not m.enabled:
                for r in await conn.fetch(store.PENDING_FOR_VEHICLE, v.pk):
                    row = dict(await conn.fetchrow(store.SESSION_BY_ID, r["session"]))
                    asked = await conn.fetchval(store.ASKED_CAUSE, row["id"])
                    state, effects = sessions.apply(
                        store.session_state(row, asked), sessions.OptedOut(), now=now
                    )
                    await run(ctx, row, state, effects)
            await publish_status(ctx)
        log.info("opt-in", owner=p.owner, vehicle=p.vehicle, enabled=m.enabled)
        self.wake()

    async def push(self, p: topics.Parsed, m: wire.PushRegistration) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            v = await store.lock_vehicle(conn, p.owner, p.vehicle)
            await push_tokens.register(conn, v.pk, m)
        log.info(
            "push registration",
            owner=p.owner,
            vehicle=p.vehicle,
            app_id=m.app_id,
            platform=m.platform,
            active=m.token is not None,
        )

    async def decision(self, p: topics.Parsed, topic: str, d: wire.Decision) -> None:
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            v = await store.find_vehicle(conn, p.owner, p.vehicle)
            if v is None:
                raise errors.UnknownVehicle(topic, f"no vehicle {p.vehicle!r} known for this owner")
            v = await store.lock_vehicle(conn, p.owner, p.vehicle)
            q = await conn.fetchrow(store.QUESTION, p.name)
            if q is None or q["vehicle"] != v.pk:
                raise errors.UnknownRequest(topic, f"no question {p.name} for this vehicle")
            if q["state"] == "answered":
                raise errors.AlreadyAnswered(
                    topic, f"question {p.name} was already answered ({q['answer']})"
                )
            if q["state"] != "pending":
                raise errors.UnknownRequest(topic, f"question {p.name} is {q['state']}")
            allowed = wire.SHARE_CHOICES if q["kind"] == "share" else wire.ABORT_CHOICES
            if d.choice not in allowed:
                raise errors.InvalidChoice(
                    topic, f"choice {d.choice!r} is not one of {', '.join(allowed)}"
                )
            row = dict(await conn.fetchrow(store.SESSION_BY_ID, q["session"]))
            ctx = Ctx(conn, self.settings, now, v)
            await conn.execute(store.ANSWER_QUESTION, p.name, d.choice, now)
            await clear_question(ctx, p.name)
            event: sessions.Event
            if q["kind"] == "share":
                event = sessions.Answered(d.choice)
                if d.choice in ("always", "once"):
                    await conn.execute(
                        store.SET_EXTRAS, row["id"], d.charge_point, d.comment, d.ocm_id
                    )
                    row.update(
                        charge_point=d.charge_point or row["charge_point"],
                        comment=d.comment or row["comment"],
                        ocm_id=d.ocm_id or row["ocm_id"],
                    )
            else:
                event = sessions.CauseGiven(d.choice)
            asked = await conn.fetchval(store.ASKED_CAUSE, row["id"])
            try:
                state, effects = sessions.apply(store.session_state(row, asked), event, now=now)
            except sessions.IllegalTransition as exc:
                raise errors.InvalidChoice(topic, str(exc)) from None
            await run(ctx, row, state, effects)
            await publish_status(ctx)
        log.info("decision", owner=p.owner, vehicle=p.vehicle, request_id=p.name, choice=d.choice)
        self.wake()


def _text(topic: str, payload: bytes) -> str:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidPayload(topic, "payload is not UTF-8 text") from None
    if len(text) > wire.MAX_PAYLOAD:
        raise errors.InvalidPayload(topic, f"payload longer than {wire.MAX_PAYLOAD} bytes")
    return text


M = TypeVar("M", bound=pydantic.BaseModel)


def _model(cls: type[M], topic: str, payload: bytes) -> M:
    if len(payload) > wire.MAX_PAYLOAD:
        raise errors.InvalidPayload(topic, f"payload longer than {wire.MAX_PAYLOAD} bytes")
    try:
        return cls.model_validate_json(payload)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "payload"
        raise errors.InvalidPayload(topic, f"{where}: {first['msg']}") from None
