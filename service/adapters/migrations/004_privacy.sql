-- Privacy: a retracted session keeps no place in any stored version; retention finds old history.
--
-- `publications` keeps the content first stored for each (session, version). Retraction is the
-- exception (docs/privacy.md): once a `retracted` version is stored, every earlier version of the
-- session, and every copy of one still waiting in the outbox, is rewritten the same way, so that a
-- partner reading the feed from its start never sees the place of a retracted session again.

CREATE FUNCTION chargeshare_retracted(record jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT record || '{"status": "retracted", "latitude": null, "longitude": null,
                       "station": null, "charge_point": null, "comment": null}'::jsonb
$$;

CREATE FUNCTION chargeshare_scrub_retracted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE publications
    SET record = chargeshare_retracted(record)
    WHERE session = NEW.session AND version < NEW.version;
    -- Queued MQTT events carry ordering key 'session:<id>', webhooks '<partner id>:<id>'.
    UPDATE outbox
    SET payload = convert_to(
        jsonb_set(convert_from(payload, 'UTF8')::jsonb, '{session}',
                  chargeshare_retracted(convert_from(payload, 'UTF8')::jsonb -> 'session'))::text,
        'UTF8')
    WHERE kind IN ('mqtt', 'webhook')
      AND (ordering_key = 'session:' || NEW.session::text
           OR ordering_key LIKE '%:' || NEW.session::text)
      AND length(payload) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER publications_retracted
AFTER INSERT ON publications
FOR EACH ROW WHEN (NEW.record ->> 'status' = 'retracted')
EXECUTE FUNCTION chargeshare_scrub_retracted();

-- Retention (service/retention.py) deletes unshared history by age.
CREATE INDEX sessions_unshared_ended ON sessions (ended_at)
    WHERE share IN ('private', 'unshared') AND NOT is_open;
