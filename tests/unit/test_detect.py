"""OVMS readings → charge phases and changes (service.domain.detect)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.domain import detect
from service.domain.detect import Change, Phase

# ---- phase_of: every documented state x substate, with v.c.charging no and yes ---------------

SUBSTATES = [
    "scheduledstop",
    "scheduledstart",
    "onrequest",
    "timerwait",
    "powerwait",
    "stopped",
    "interrupted",
    "",
]
# One row per v.c.state; one letter per substate above.
# I idle, C charging, P paused, D done, A aborted, S stopped by the owner.
PHASES_NOT_CHARGING = """
charging   C C C C C C C C
topoff     P P P P P P P P
done       D D D D D D D D
prepare    P P P P P P P P
timerwait  P A P P P A A A
heating    P P P P P P P P
stopped    D A S P P A A A
-          I I I P P I I I
"""
PHASES_CHARGING = """
charging   C C C C C C C C
topoff     C C C C C C C C
done       D D D D D D D D
prepare    C C C C C C C C
timerwait  C A C C C A A A
heating    C C C C C C C C
stopped    D A S C C A A A
-          C C C C C C C C
"""
LETTER = {
    "I": Phase.IDLE,
    "C": Phase.CHARGING,
    "P": Phase.PAUSED,
    "D": Phase.DONE,
    "A": Phase.ABORTED,
    "S": Phase.STOPPED,
}


def phase_cases(table: str, charging: str) -> list[tuple[str, str, str, Phase]]:
    cases = []
    for line in table.strip().splitlines():
        state, *letters = line.split()
        assert len(letters) == len(SUBSTATES)
        for substate, letter in zip(SUBSTATES, letters, strict=True):
            cases.append((charging, "" if state == "-" else state, substate, LETTER[letter]))
    return cases


@pytest.mark.parametrize(
    ("charging", "state", "substate", "expected"),
    phase_cases(PHASES_NOT_CHARGING, "no") + phase_cases(PHASES_CHARGING, "yes"),
)
def test_phase_of_every_state_and_substate(
    charging: str, state: str, substate: str, expected: Phase
) -> None:
    """Each documented state/substate pair, charging or not, maps to the phase DESIGN §2 gives."""
    metrics = {"v.c.charging": charging, "v.c.state": state, "v.c.substate": substate}
    assert detect.phase_of(metrics) == expected


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({}, Phase.IDLE),
        ({"v.c.charging": "yes"}, Phase.CHARGING),
        ({"v.c.state": "charging"}, Phase.CHARGING),
        ({"v.c.state": " Charging "}, Phase.CHARGING),
        ({"v.c.state": "error"}, Phase.ABORTED),
        ({"v.c.state": "init", "v.c.charging": "no"}, Phase.IDLE),
        ({"v.c.charging": "garbage", "v.c.state": ""}, Phase.IDLE),
        ({"v.c.charging": "1", "v.c.state": ""}, Phase.CHARGING),
    ],
)
def test_phase_of_partial_and_odd_metrics(metrics: dict[str, str], expected: Phase) -> None:
    """Missing, oddly cased or unknown values fall back to sensible phases."""
    assert detect.phase_of(metrics) == expected


# ---- change: every (previous, current, session_open) ----------------------------------------

ORDER = [Phase.IDLE, Phase.CHARGING, Phase.PAUSED, Phase.DONE, Phase.ABORTED, Phase.STOPPED]
# Rows: previous phase; columns: current phase in ORDER.
CHANGES_NO_SESSION = """
idle      -        start    -      -         -      -
charging  -        -        pause  complete  abort  owner_stop
paused    -        start    -      complete  abort  owner_stop
done      -        start    -      -         -      -
aborted   -        start    -      -         -      -
stopped   -        start    -      -         -      -
"""
CHANGES_OPEN_SESSION = """
idle      -        resume   -      -         -      -
charging  complete -        pause  complete  abort  owner_stop
paused    complete resume   -      complete  abort  owner_stop
done      -        resume   -      -         -      -
aborted   -        resume   -      -         -      -
stopped   -        resume   -      -         -      -
"""


def change_cases(table: str, session_open: bool) -> list[tuple[Phase, Phase, bool, Change]]:
    cases = []
    for line in table.strip().splitlines():
        previous, *cells = line.split()
        for current, cell in zip(ORDER, cells, strict=True):
            expected = Change.NONE if cell == "-" else Change(cell)
            cases.append((Phase(previous), current, session_open, expected))
    return cases


ALL_CHANGES = change_cases(CHANGES_NO_SESSION, False) + change_cases(CHANGES_OPEN_SESSION, True)


def test_change_table_covers_every_pair() -> None:
    """The change table lists every (previous, current, open) combination exactly once."""
    keys = {(p, c, o) for p, c, o, _ in ALL_CHANGES}
    assert keys == set(itertools.product(Phase, Phase, [False, True]))
    assert len(ALL_CHANGES) == len(keys)


@pytest.mark.parametrize(("previous", "current", "session_open", "expected"), ALL_CHANGES)
def test_change(previous: Phase, current: Phase, session_open: bool, expected: Change) -> None:
    """A phase change maps to the session change of the table."""
    assert detect.change(previous, current, session_open) == expected


def replay(updates: list[tuple[str, str]], metrics: dict[str, str] | None = None) -> list[Change]:
    """Apply metric updates one at a time, tracking an open session like the service would."""
    metrics = dict(metrics or {})
    phase, session_open = detect.phase_of(metrics), False
    seen: list[Change] = []
    for name, value in updates:
        metrics[name] = value
        new = detect.phase_of(metrics)
        c = detect.change(phase, new, session_open)
        if c in (Change.START, Change.RESUME):
            session_open = True
        elif c in (Change.COMPLETE, Change.ABORT, Change.OWNER_STOP):
            session_open = False
        if c != Change.NONE:
            seen.append(c)
        phase = new
    return seen


@pytest.mark.parametrize(
    "updates",
    list(
        itertools.permutations(
            [("v.c.charging", "no"), ("v.c.state", "stopped"), ("v.c.substate", "interrupted")]
        )
    ),
)
def test_abort_is_an_abort_in_any_metric_order(updates: list[tuple[str, str]]) -> None:
    """An interrupted charge ends in exactly one ABORT whatever order its metrics arrive in."""
    start = [("v.c.charging", "yes"), ("v.c.state", "charging")]
    changes = replay([*start, *updates], {"v.c.charging": "no"})
    assert changes[0] == Change.START
    assert changes[-1] == Change.ABORT
    assert changes.count(Change.ABORT) == 1
    assert Change.COMPLETE not in changes


@pytest.mark.parametrize(
    "updates",
    list(
        itertools.permutations(
            [("v.c.charging", "no"), ("v.c.state", "done"), ("v.c.substate", "stopped")]
        )
    ),
)
def test_completion_in_any_metric_order(updates: list[tuple[str, str]]) -> None:
    """A finished charge ends in exactly one COMPLETE whatever order its metrics arrive in."""
    changes = replay([("v.c.state", "charging"), *updates])
    assert changes == [Change.START, Change.COMPLETE]


def test_pauses_inside_one_plug_in_are_one_session() -> None:
    """Topoff, timerwait and powerwait pauses inside one charge give PAUSE/RESUME, one START."""
    changes = replay(
        [
            ("v.c.state", "charging"),
            ("v.c.charging", "yes"),
            ("v.c.charging", "no"),
            ("v.c.state", "topoff"),
            ("v.c.charging", "yes"),
            ("v.c.charging", "no"),
            ("v.c.substate", "powerwait"),
            ("v.c.state", "timerwait"),
            ("v.c.state", "charging"),
            ("v.c.state", "done"),
        ]
    )
    assert changes == [
        Change.START,
        Change.PAUSE,
        Change.RESUME,
        Change.PAUSE,
        Change.RESUME,
        Change.COMPLETE,
    ]


def test_owner_stop_is_reported_as_owner_stop() -> None:
    """State stopped with substate onrequest ends the session as a stop by the owner."""
    changes = replay(
        [
            ("v.c.substate", "onrequest"),
            ("v.c.state", "charging"),
            ("v.c.charging", "yes"),
            ("v.c.state", "stopped"),
            ("v.c.charging", "no"),
        ]
    )
    assert changes == [Change.START, Change.OWNER_STOP]


# ---- parsers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", True),
        ("no", False),
        ("1", True),
        ("0", False),
        ("TRUE", True),
        (" false ", False),
        ("", None),
        ("maybe", None),
    ],
)
def test_parse_bool(text: str, expected: bool | None) -> None:
    """OVMS booleans parse; anything else is None."""
    assert detect.parse_bool(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("96.3", 96.3),
        ("51.302300", 51.3023),
        ("-0.5", -0.5),
        ("2e3", 2000.0),
        (" 7 ", 7.0),
        (".5", 0.5),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("-Infinity", None),
        ("1e300", None),
        ("1_000", None),
        ("٣", None),
        ("12V", None),
        ("0x10", None),
    ],
)
def test_parse_float(text: str, expected: float | None) -> None:
    """Plain decimal numbers parse; non-finite, huge or decorated values are None."""
    assert detect.parse_float(text) == expected


@given(st.text())
def test_parse_float_never_raises(text: str) -> None:
    """parse_float returns a finite bounded float or None for any text."""
    x = detect.parse_float(text)
    assert x is None or abs(x) <= detect.MAX_NUMBER


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-11-11 18:19:21 UTC", datetime(2024, 11, 11, 18, 19, 21, tzinfo=UTC)),
        ("2024-11-11 18:19:21", datetime(2024, 11, 11, 18, 19, 21, tzinfo=UTC)),
        ("2024-11-11T18:19:21Z", datetime(2024, 11, 11, 18, 19, 21, tzinfo=UTC)),
        ("2024-11-11 19:19:21 +01:00", datetime(2024, 11, 11, 18, 19, 21, tzinfo=UTC)),
        ("1731349161", datetime(2024, 11, 11, 18, 19, 21, tzinfo=UTC)),
        ("2024-11-11 18:19:21 CET", None),
        ("0", None),
        ("1970-01-01 00:00:12 UTC", None),
        ("2024-13-01 00:00:00 UTC", None),
        ("99999999999", None),
        ("yesterday", None),
        ("", None),
    ],
)
def test_parse_time(text: str, expected: datetime | None) -> None:
    """UTC text and epoch times parse to aware UTC; zone abbreviations and unset clocks are None."""
    t = detect.parse_time(text)
    assert t == expected
    if t is not None:
        assert t.tzinfo is UTC


@given(st.text(max_size=40))
def test_parse_time_never_raises(text: str) -> None:
    """parse_time returns an aware time or None for any text."""
    t = detect.parse_time(text)
    assert t is None or t.utcoffset() is not None


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("v.p.latitude", "51.302300", None),
        ("v.p.latitude", "91", "v.p.latitude must be a number in -90..90"),
        ("v.p.latitude", "north", "v.p.latitude must be a number in -90..90"),
        ("v.p.longitude", "-181", "v.p.longitude must be a number in -180..180"),
        ("v.p.longitude", "", "v.p.longitude must be a number in -180..180"),
        ("v.p.latitude", "nan", "v.p.latitude must be a number in -90..90"),
        ("v.c.charging", "yes", None),
        ("v.c.charging", "perhaps", "v.c.charging must be yes or no"),
        ("v.c.kwh", "12.5", None),
        ("v.c.kwh", "lots", "v.c.kwh must be a number"),
        ("v.c.state", "charging", None),
        ("v.c.state", "", None),
        ("v.c.state", "x" * 257, "v.c.state value is longer than 256 characters"),
        ("v.c.state", "char\x00ging", "v.c.state value contains control characters"),
        ("m.time.utc", "2024-11-11 18:19:21 UTC", None),
        ("m.time.utc", "1731349161", None),
        ("m.time.utc", "teatime", "m.time.utc must be a time like 2024-11-11 18:19:21 UTC"),
        ("v.b.soc", "", None),
    ],
)
def test_valid_metric_value(name: str, value: str, reason: str | None) -> None:
    """Metric values are checked by kind, with a human reason for every refusal."""
    got = detect.valid_metric_value(name, value)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason)


@given(st.sampled_from(sorted(detect.POSITION_METRICS)), st.text(max_size=30))
def test_accepted_position_values_are_finite_floats(name: str, value: str) -> None:
    """A position value that passes validation converts with float() to a finite coordinate."""
    if detect.valid_metric_value(name, value) is None:
        assert abs(float(value)) <= 180.0


def test_kept_metrics_never_include_the_position() -> None:
    """The kept metric set holds charge metrics but never coordinates or geofence names."""
    assert {"v.c.charging", "v.c.state", "v.b.soc", "v.type", "m.time.utc"} <= detect.KEPT_METRICS
    assert not detect.KEPT_METRICS & detect.POSITION_METRICS
    assert "v.p.location" not in detect.KEPT_METRICS


def test_reading_collects_numbers_and_connector() -> None:
    """A reading takes the charge numbers, connector and vehicle type from the metrics."""
    r = detect.reading(
        {
            "v.c.kwh": "12.5",
            "v.c.power": "7.2",
            "v.c.voltage": "231",
            "v.c.current": "32",
            "v.b.soc": "80.5",
            "v.c.type": "type2",
            "v.type": "RT",
            "v.c.time": "3600",
        }
    )
    assert r == detect.Reading(12.5, 7.2, 231.0, 32.0, 80.5, "type2", "RT", 3600.0)


@pytest.mark.parametrize("value", ["", "undefined", "  "])
def test_reading_without_connector(value: str) -> None:
    """An empty or undefined connector type reads as None, as do missing numbers."""
    r = detect.reading({"v.c.type": value, "v.c.kwh": "junk"})
    assert r.connector is None and r.energy_kwh is None and r.vehicle_type is None


@pytest.mark.parametrize(
    ("connector", "ocm_id"),
    [
        ("type1", 1),
        ("chademo", 2),
        ("roadster", 8),
        ("type2", 25),
        ("supercharger", 27),
        ("teslaus", 30),
        ("ccs", 33),
        ("undefined", None),
    ],
)
def test_ocm_connection_type(connector: str, ocm_id: int | None) -> None:
    """Each OVMS connector type maps to its Open Charge Map ConnectionTypeID."""
    assert detect.OCM_CONNECTION_TYPE[connector] == ocm_id


# ---- grid log records ------------------------------------------------------------------------


def grid(version: int = 2, storetime: str = "86400", **fields: str) -> str:
    """Build a `*-LOG-Grid` record with plausible values, overridden by f<n>=... fields."""
    n = detect.GRID_FIELDS.get(version, 45)
    values = ["0"] * n
    defaults = {
        1: "1",
        2: "51.302300",
        3: "0.401450",
        4: "12.0",
        5: "Home",
        6: "type2",
        7: "charging",
        8: "onrequest",
        9: "standard",
        20: "3600",
        21: "12.500",
        22: "13.900",
        28: "80.0",
        45: "12345.6",
    }
    for k, v in defaults.items():
        if k <= n:
            values[k - 1] = v
    for key, text in fields.items():
        values[int(key[1:]) - 1] = text
    return f"*-LOG-Grid,{version},{storetime}," + ",".join(values)


def test_parse_grid_record_v2() -> None:
    """A version 2 record with 45 fields parses into its charge fields and odometer."""
    r = detect.parse_grid_record(grid())
    assert r == detect.GridRecord(
        version=2,
        store_time_s=86400,
        gpslock=True,
        latitude=51.3023,
        longitude=0.40145,
        location_name="Home",
        charge_type="type2",
        state="charging",
        substate="onrequest",
        mode="standard",
        charge_time_s=3600.0,
        charge_kwh=12.5,
        charge_kwh_grid=13.9,
        soc=80.0,
        odometer=12345.6,
    )
    assert r.phase() == Phase.CHARGING


def test_parse_grid_record_v1_has_no_odometer() -> None:
    """A version 1 record has 44 fields and no odometer."""
    r = detect.parse_grid_record(grid(version=1, f7="stopped", f8="interrupted"))
    assert r.version == 1 and r.odometer is None and r.soc == 80.0
    assert r.phase() == Phase.ABORTED


def test_parse_grid_record_quoted_location() -> None:
    """A quoted location name may contain commas."""
    r = detect.parse_grid_record(grid(f5='"Car park, level 2"', f7="done"))
    assert r.location_name == "Car park, level 2"
    assert r.phase() == Phase.DONE


def test_parse_grid_record_cut_at_line_feed_and_cr_in_text() -> None:
    """A record is cut at its first LF, and a CR inside a string (mp_encode) becomes a space."""
    r = detect.parse_grid_record(grid(f5="Two\rLines") + "\nignored,trailer")
    assert r.location_name == "Two Lines"


def test_parse_grid_record_empty_numbers_are_none() -> None:
    """Empty numeric fields and an empty gpslock read as None."""
    r = detect.parse_grid_record(grid(f1="", f2="", f3="", f21=""))
    assert r.gpslock is None and r.latitude is None and r.longitude is None
    assert r.charge_kwh is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("", "must start with"),
        (grid().replace("*-LOG-Grid", "*-LOG-Trip"), "must start with"),
        (grid(version=3), "version must be 1 or 2"),
        (grid(version=1) + ",1", "needs 44 fields, got 45"),
        (grid() + ",1", "needs 45 fields, got 46"),
        (grid().rsplit(",", 1)[0], "needs 45 fields, got 44"),
        (grid(storetime="-1"), "storetime"),
        (grid(f2="91.0"), "latitude"),
        (grid(f3="-200"), "longitude"),
        (grid(f21="many"), "charge kWh"),
        (grid(f1="maybe"), "gpslock"),
        (grid(f5="x" * 300), "too long"),
        (grid(f5='"bad\x00"'), "control characters"),
        (grid(f5='"unterminated'), "not valid CSV"),
        ("x" * 5000, "longer than"),
    ],
)
def test_parse_grid_record_rejects(payload: str, reason: str) -> None:
    """Malformed records raise ValueError with a reason naming what is wrong."""
    with pytest.raises(ValueError, match=reason):
        detect.parse_grid_record(payload)


@given(st.text(max_size=600))
def test_parse_grid_record_never_raises_other_errors(text: str) -> None:
    """Arbitrary text either parses or raises ValueError."""
    try:
        detect.parse_grid_record(text)
    except ValueError:
        pass


@given(
    st.sampled_from([1, 2]),
    st.lists(st.text(max_size=12), min_size=44, max_size=46),
)
def test_grid_records_with_arbitrary_fields_raise_only_value_error(
    version: int, fields: list[str]
) -> None:
    """Well-framed records with arbitrary field text either parse or raise ValueError."""
    payload = f"*-LOG-Grid,{version},86400," + ",".join(fields)
    try:
        r = detect.parse_grid_record(payload)
    except ValueError:
        return
    assert isinstance(r.phase(), Phase)
