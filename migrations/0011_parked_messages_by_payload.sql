-- CryptoVault schema, part 11: a parked message is never lost to an earlier one at its sequence.
--
-- `parked_messages` was unique on (stream, consumer, stream_seq), and parking inserts with
-- ON CONFLICT DO NOTHING so that the same message parked twice (its terminate lost, so it came
-- back) is stored once. But a stream re-created starts its sequences again, and a message that
-- is not a JetStream delivery is parked at sequence -1: a second, different message at such a
-- sequence was counted and logged as parked, terminated, and stored nowhere. The same message
-- is now recognised by its payload too.
ALTER TABLE parked_messages DROP CONSTRAINT parked_messages_stream_consumer_stream_seq_key;
CREATE UNIQUE INDEX parked_messages_once ON parked_messages (stream, consumer, stream_seq, md5(payload));
