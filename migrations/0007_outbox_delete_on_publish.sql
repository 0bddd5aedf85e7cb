-- CryptoVault schema, part 7: the outbox keeps only what is still to be published.
--
-- The relay used to mark a row published (an UPDATE that could never be HOT: the partial index
-- below covered its column) and delete it a day later; it now deletes the row in the
-- transaction that saw JetStream acknowledge its event. Every row left is unpublished, so the
-- primary key orders the relay's scan and the partial index is one more index write per event
-- for nothing. `published_at` stays (always NULL from now on) so an engine of the previous
-- version keeps working during a rolling upgrade; a later migration drops it.
DELETE FROM outbox WHERE published_at IS NOT NULL;
DROP INDEX outbox_unpublished_idx;
COMMENT ON TABLE outbox IS 'Events committed and not yet acknowledged by the EVENTS stream';
