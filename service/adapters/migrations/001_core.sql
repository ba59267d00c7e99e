-- Core schema: owners, vehicles, locations, sessions, questions, the outbox and publications.
-- Coordinates of places that are not shared never sit here in clear: see docs/privacy.md.

CREATE TABLE owners (
    name        text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vehicles (
    id            bigserial PRIMARY KEY,
    owner         text NOT NULL REFERENCES owners (name) ON DELETE CASCADE,
    vehicle_id    text NOT NULL,
    salt          bytea NOT NULL,                      -- per-vehicle salt of location hashes
    opted_in      boolean NOT NULL DEFAULT false,
    nickname      text,
    handle        text NOT NULL,                       -- 'anon-…' shown to the owner when no nickname
    metrics       jsonb NOT NULL DEFAULT '{}'::jsonb,  -- last charge metrics (never the position)
    position_enc  bytea,                               -- last position, AES-GCM with the secret
    metrics_at    timestamptz,
    phase         text NOT NULL DEFAULT 'idle'
                  CHECK (phase IN ('idle', 'charging', 'paused', 'done', 'aborted', 'stopped')),
    judge_at      timestamptz,                         -- a metric change waits to settle until then
    changed_at    timestamptz,                         -- when the unsettled change first arrived
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner, vehicle_id)
);
CREATE INDEX vehicles_judge ON vehicles (judge_at) WHERE judge_at IS NOT NULL;

CREATE TABLE locations (
    id          bigserial PRIMARY KEY,
    vehicle     bigint NOT NULL REFERENCES vehicles (id) ON DELETE CASCADE,
    answer      text NOT NULL DEFAULT 'pending' CHECK (answer IN ('pending', 'always', 'never')),
    -- No coordinates: a place is known only by the keyed hash of its grid cell (location_cells).
    -- Coordinates live on sessions, and only while shared or asking.
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Keyed hashes of the grid cell a location lies in; looked up by hashing cells around a new fix.
CREATE TABLE location_cells (
    cell_hash   bytea NOT NULL,
    key_id      text NOT NULL,
    location    bigint NOT NULL REFERENCES locations (id) ON DELETE CASCADE,
    PRIMARY KEY (cell_hash, location)
);
CREATE INDEX location_cells_location ON location_cells (location);

CREATE TABLE sessions (
    id            uuid PRIMARY KEY,
    vehicle       bigint NOT NULL REFERENCES vehicles (id) ON DELETE CASCADE,
    location      bigint REFERENCES locations (id) ON DELETE SET NULL,
    is_open       boolean NOT NULL DEFAULT true,
    status        text NOT NULL
                  CHECK (status IN ('charging', 'completed', 'interrupted', 'stopped')),
    share         text NOT NULL
                  CHECK (share IN ('private', 'asking', 'shared', 'unshared', 'retracted')),
    source        text NOT NULL CHECK (source IN ('metrics', 'gridlog')),
    started_at    timestamptz NOT NULL,
    ended_at      timestamptz,
    latitude      double precision,                   -- only while shared or asking
    longitude     double precision,
    region        text,          -- first 3 geohash characters: the public topic's g1/g2/g3
    energy_kwh    double precision,
    max_power_kw  double precision,
    max_voltage   double precision,
    max_current   double precision,
    soc_start     double precision,
    soc_end       double precision,
    connector     text,
    vehicle_type  text,
    cause         text CHECK (cause IN ('user_interrupted', 'station_fault', 'other_fault')),
    charge_point  text,
    comment       text,
    ocm_id        integer,
    version       integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (NOT is_open OR ended_at IS NULL),
    CHECK (status = 'charging' OR ended_at IS NOT NULL),
    CHECK ((latitude IS NULL) = (longitude IS NULL))
);
CREATE UNIQUE INDEX sessions_one_open ON sessions (vehicle) WHERE is_open;
CREATE INDEX sessions_vehicle_time ON sessions (vehicle, started_at);

-- Append-only history of what happened to each session.
CREATE TABLE session_events (
    id          bigserial PRIMARY KEY,
    session     uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL,
    event       text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX session_events_session ON session_events (session);

CREATE TABLE questions (
    request_id  text PRIMARY KEY,
    session     uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    vehicle     bigint NOT NULL REFERENCES vehicles (id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('share', 'abort_reason')),
    state       text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'answered', 'expired', 'withdrawn')),
    answer      text,
    answered_at timestamptz,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    CHECK ((state = 'answered') = (answer IS NOT NULL))
);
CREATE UNIQUE INDEX questions_one_pending ON questions (session, kind) WHERE state = 'pending';
CREATE INDEX questions_expiry ON questions (expires_at) WHERE state = 'pending';

-- Every published version of every session: the source of MQTT, webhooks and the pull API.
-- `xid` orders the pull cursor by commit (see service/adapters/api.py).
CREATE TABLE publications (
    seq         bigserial PRIMARY KEY,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    session     uuid NOT NULL,
    version     integer NOT NULL,
    event_type  text NOT NULL,
    record      jsonb NOT NULL,
    happened_at timestamptz NOT NULL,
    UNIQUE (session, version)
);
CREATE INDEX publications_xid ON publications (xid, seq);

-- Everything that leaves the process: MQTT publishes (kind 'mqtt'), pushes, webhooks.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('mqtt', 'push', 'webhook')),
    topic         text,                 -- mqtt: topic
    payload       bytea NOT NULL,       -- exact bytes to send (empty retained = clear)
    qos           smallint NOT NULL DEFAULT 1,
    retain        boolean NOT NULL DEFAULT false,
    target        bigint,               -- push: push_tokens.id; webhook: partners.id
    ordering_key  text,                 -- sends with one key go out in id order
    attempts      integer NOT NULL DEFAULT 0,
    available_at  timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_error    text
);
CREATE INDEX outbox_due ON outbox (kind, available_at, id);

CREATE TABLE push_tokens (
    id          bigserial PRIMARY KEY,
    vehicle     bigint NOT NULL REFERENCES vehicles (id) ON DELETE CASCADE,
    app_id      text NOT NULL,
    platform    text NOT NULL CHECK (platform IN ('fcm', 'apns')),
    token       text NOT NULL,
    sandbox     boolean NOT NULL DEFAULT false,
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vehicle, app_id)
);

CREATE TABLE partners (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    mqtt_username   text NOT NULL UNIQUE,
    api_key_hash    bytea NOT NULL,
    api_key_prefix  text NOT NULL,
    webhook_url     text,
    webhook_secret  text,              -- needed to sign; see docs/privacy.md
    webhook_enabled boolean NOT NULL DEFAULT false,
    enabled         boolean NOT NULL DEFAULT true,
    license         text NOT NULL,
    license_accepted_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE deliveries (
    id          bigserial PRIMARY KEY,
    partner     bigint NOT NULL REFERENCES partners (id) ON DELETE CASCADE,
    outbox_id   bigint NOT NULL,
    webhook_id  text NOT NULL,
    attempt     integer NOT NULL,
    status      integer,                -- HTTP status, null when no answer
    error       text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_partner ON deliveries (partner, at DESC);
