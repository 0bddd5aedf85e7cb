-- CryptoVault schema, part 8: the outbox's `published_at` column goes.
--
-- Since part 7 the relay deletes a row once JetStream acknowledged its event and nothing reads
-- or writes `published_at`; part 7 kept the column only so that engines of the version before
-- it (which marked rows published) kept working while a rolling upgrade replaced them. Every
-- engine now deployed deletes on publish, so the column is dropped. Upgrade one release at a
-- time: an engine from before part 7 cannot run against this schema.
ALTER TABLE outbox DROP COLUMN published_at;
