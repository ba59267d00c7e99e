-- The outbox lease looks for an earlier row with the same ordering key for every candidate row;
-- with thousands of rows waiting (measured in bench/) that was a scan per candidate.
CREATE INDEX outbox_ordering ON outbox (ordering_key, kind, id) WHERE ordering_key IS NOT NULL;
