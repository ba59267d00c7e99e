-- Partners: key rotation with a grace period, the webhook secret encrypted, why a webhook stopped.
-- The API key and MQTT password authenticate a partner: only their hashes are stored. The webhook
-- secret is symmetric (the service signs with it), so it is kept AES-GCM encrypted with a key
-- derived from the location secret, which lives outside the database (service/webhooks.py).

ALTER TABLE partners DROP COLUMN webhook_secret;
ALTER TABLE partners ADD COLUMN webhook_secret_enc bytea;
ALTER TABLE partners ADD COLUMN webhook_disabled_at timestamptz;
ALTER TABLE partners ADD COLUMN webhook_disabled_reason text;
ALTER TABLE partners ADD COLUMN api_key_hash_previous bytea;
ALTER TABLE partners ADD COLUMN api_key_prefix_previous text;
ALTER TABLE partners ADD COLUMN api_key_previous_until timestamptz;
ALTER TABLE partners ADD CONSTRAINT partners_webhook_secret
    CHECK (webhook_url IS NULL OR webhook_secret_enc IS NOT NULL);

CREATE INDEX partners_key_prefix ON partners (api_key_prefix);
CREATE INDEX partners_key_prefix_previous ON partners (api_key_prefix_previous)
    WHERE api_key_prefix_previous IS NOT NULL;
CREATE INDEX deliveries_outbox ON deliveries (outbox_id);
