//! The backbone contract against a real nats-server: declarations are idempotent, publishes
//! carry their dedupe id and request id, readiness notices and heals missing objects.

use async_nats::jetstream::stream::StorageType;
use chrono::Utc;
use futures::StreamExt;
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind};
use vault_bus::{Bus, EnsureOutcome, MessageContext, consumers, streams};
use vault_testkit::NatsServer;

fn auth_event(id: Uuid) -> AuthEvent {
    AuthEvent {
        id,
        kind: AuthEventKind::Signup,
        user_id: Some(Uuid::now_v7()),
        request_id: Some("req-42".into()),
        ip: Some("127.0.0.1".into()),
        at: Utc::now(),
        data: serde_json::json!({}),
    }
}

#[tokio::test]
async fn declaring_the_streams_twice_changes_nothing() {
    let nats = NatsServer::start().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");

    let first = bus.ensure_streams().await.expect("declares");
    assert_eq!(first.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["ORDERS", "EVENTS", "AUTH", "PRICES"]);
    assert!(first.iter().all(|(_, o)| *o == EnsureOutcome::Created), "{first:?}");

    let js = bus.jetstream();
    let mut created = Vec::new();
    for spec in streams::ALL {
        let mut stream = js.get_stream(spec.name).await.expect("stream exists");
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.subjects, spec.subjects);
        assert_eq!(info.config.storage, StorageType::File);
        assert_eq!(info.config.max_age, spec.max_age);
        assert_eq!(info.config.duplicate_window, spec.duplicate_window);
        assert_eq!(info.config.num_replicas, 1);
        created.push(info.created);
    }
    bus.publish(&auth_event(Uuid::now_v7()), &MessageContext::default()).await.expect("published");

    let second = bus.ensure_streams().await.expect("declares again");
    assert!(second.iter().all(|(_, o)| *o == EnsureOutcome::Unchanged), "{second:?}");
    for (spec, created) in streams::ALL.iter().zip(created) {
        let mut stream = js.get_stream(spec.name).await.expect("stream exists");
        let info = stream.info().await.expect("info");
        assert_eq!(info.created, created, "{} was recreated", spec.name);
    }
    let mut auth = js.get_stream("AUTH").await.expect("AUTH");
    assert_eq!(auth.info().await.expect("info").state.messages, 1, "the second start must keep messages");
}

#[tokio::test]
async fn a_drifted_stream_is_put_back_to_its_declaration() {
    let nats = NatsServer::start().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("declares");

    let mut drifted = streams::PRICES.config(1);
    drifted.max_age = std::time::Duration::from_secs(3600);
    bus.jetstream().update_stream(drifted).await.expect("operator changes the stream");

    let outcomes = bus.ensure_streams().await.expect("declares again");
    assert!(outcomes.contains(&("PRICES", EnsureOutcome::Updated)), "{outcomes:?}");
    let mut prices = bus.jetstream().get_stream("PRICES").await.expect("PRICES");
    assert_eq!(prices.info().await.expect("info").config.max_age, streams::PRICES.max_age);
}

#[tokio::test]
async fn a_publish_carries_its_ids_and_a_duplicate_is_stored_once() {
    let nats = NatsServer::start().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("declares");

    let event = auth_event(Uuid::now_v7());
    let ctx = MessageContext { request_id: Some("req-42".into()) };
    let first = bus.publish(&event, &ctx).await.expect("ack");
    let again = bus.publish(&event, &ctx).await.expect("ack for the duplicate");
    assert!(!first.duplicate);
    assert!(again.duplicate, "JetStream must recognise the same Nats-Msg-Id");
    assert_eq!(again.sequence, first.sequence);

    let stream = bus.jetstream().get_stream("AUTH").await.expect("AUTH");
    let stored = stream.get_raw_message(first.sequence).await.expect("stored message");
    assert_eq!(stored.subject.as_str(), "auth.signup");
    let headers = stored.headers;
    assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some(event.id.to_string().as_str()));
    assert_eq!(headers.get("X-Request-Id").map(|v| v.as_str()), Some("req-42"));
    let decoded: AuthEvent = vault_bus::message::decode("auth.signup", &stored.payload).expect("decodes");
    assert_eq!(decoded, event);
}

#[tokio::test]
async fn consumers_are_declared_once_and_left_alone_after() {
    let nats = NatsServer::start().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("declares");

    let all = consumers::all();
    let first = bus.ensure_consumers(&all).await.expect("declares consumers");
    assert_eq!(first.len(), 16 + 3 + 2);
    assert!(first.iter().all(|(_, o)| *o == EnsureOutcome::Created), "{first:?}");
    let second = bus.ensure_consumers(&all).await.expect("declares consumers again");
    assert!(second.iter().all(|(_, o)| *o == EnsureOutcome::Unchanged), "{second:?}");

    let orders = bus.jetstream().get_stream("ORDERS").await.expect("ORDERS");
    let info = orders.consumer_info("engine-p07").await.expect("consumer exists");
    assert_eq!(info.config.filter_subject, "orders.7.*");
    assert_eq!(info.config.max_deliver, consumers::SERVER_MAX_DELIVER);
    let mut names: Vec<String> = orders.consumer_names().map(|n| n.expect("name")).collect().await;
    names.sort();
    assert_eq!(names.len(), 17, "16 engine partitions and the audit consumer: {names:?}");
}

/// The audit worker's consumer of AUTH, alone: what the tests below consume from.
fn audit_auth() -> Vec<consumers::ConsumerSpec> {
    let specs: Vec<_> = consumers::all().into_iter().filter(|c| c.durable == "audit-auth").collect();
    assert_eq!(specs.len(), 1, "the audit consumer of AUTH");
    specs
}

/// The server never drops a message for its delivery count: a consumer that keeps giving it
/// back (every write failing while Postgres is down, the park too) gets it again past
/// `MAX_DELIVER`, until it is written or parked. A consumer declared by an earlier release with
/// a server-side limit is updated.
#[tokio::test]
async fn a_message_given_back_past_max_deliver_is_still_delivered() {
    let nats = NatsServer::start().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("declares");
    let audit = audit_auth();
    let stream = bus.jetstream().get_stream("AUTH").await.expect("AUTH");
    let mut old = audit[0].config();
    old.max_deliver = consumers::MAX_DELIVER;
    stream.create_consumer(old).await.expect("declared as an earlier release did");
    let updated = bus.ensure_consumers(&audit).await.expect("declares");
    assert_eq!(updated[0].1, EnsureOutcome::Updated, "{updated:?}");

    bus.publish(&auth_event(Uuid::now_v7()), &MessageContext::default()).await.expect("published");
    let consumer = bus.pull_consumer("AUTH", "audit-auth").await.expect("consumer");
    let mut messages = consumer.messages().await.expect("pull");
    for delivery in 1..=consumers::MAX_DELIVER + 3 {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {delivery} never came"))
            .expect("a message")
            .expect("no error");
        assert_eq!(msg.info().expect("info").delivered as i64, delivery);
        msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await.expect("nak");
    }
}

/// The API's way with the engine's consumers: a missing one is created, one that exists is left
/// as it is even when its configuration differs (the engine owns it).
#[tokio::test]
async fn creating_missing_consumers_leaves_an_existing_one_as_it_is() {
    let nats = NatsServer::start().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("declares");
    let engine = consumers::engine(vault_core::config::PartitionRange::all());
    let mut own = engine[3].clone();
    own.description = "an engine of another release".into();
    bus.ensure_consumers(&[own]).await.expect("the engine declares one");

    let outcomes = bus.create_missing_consumers(&engine).await.expect("creates the rest");
    assert_eq!(outcomes.len(), 16);
    for (name, outcome) in &outcomes {
        let want = if name == "engine-p03" { EnsureOutcome::Unchanged } else { EnsureOutcome::Created };
        assert_eq!(*outcome, want, "{name}");
    }
    let orders = bus.jetstream().get_stream("ORDERS").await.expect("ORDERS");
    let kept = orders.consumer_info("engine-p03").await.expect("engine-p03");
    assert_eq!(kept.config.description.as_deref(), Some("an engine of another release"));
    assert!(
        bus.create_missing_consumers(&engine).await.expect("again").iter().all(|(_, o)| *o == EnsureOutcome::Unchanged)
    );
}

#[tokio::test]
async fn readiness_fails_while_a_stream_is_missing_and_heals_itself() {
    let nats = NatsServer::start().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("declares");
    let audit = consumers::audit();
    bus.ensure_consumers(&audit).await.expect("declares consumers");
    let check = bus.readiness_check(audit);
    assert_eq!(check().await, Ok(()));

    bus.jetstream().delete_stream("AUTH").await.expect("operator deletes a stream");
    let verdict = check().await.expect_err("a missing stream is not ready");
    assert!(verdict.contains("stream AUTH"), "{verdict}");

    // The failed check declared it again, consumers included: the next one passes.
    assert_eq!(check().await, Ok(()));
    let auth = bus.jetstream().get_stream("AUTH").await.expect("AUTH is back");
    auth.consumer_info("audit-auth").await.expect("its consumer is back");
}

/// A batch lingers for more messages from its first one: after an idle spell longer than the
/// linger, a burst still arrives as one batch (the linger used to count from when the loop began
/// waiting, so it had run out and the first message went alone).
#[tokio::test]
async fn a_batch_lingers_from_its_first_message_even_after_an_idle_spell() {
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;
    use vault_bus::batch;
    let nats = NatsServer::start().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("declares");
    let specs = audit_auth();
    bus.ensure_consumers(&specs).await.expect("the consumer");
    // Nothing is parked here, so the pool is never used.
    let pool = sqlx::PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").expect("a lazy pool");
    let (sizes, mut batches) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let flush = |b: Vec<batch::Delivered<()>>| {
        let sizes = sizes.clone();
        async move {
            for d in &b {
                d.ack().await;
            }
            let _ = sizes.send(b.len());
        }
    };
    let decode = |_: &'static str, _: &async_nats::jetstream::Message| Ok::<(), String>(());
    let consuming =
        batch::consume(&bus, &pool, &specs, 100, Duration::from_millis(500), shutdown.clone(), decode, flush);
    let driving = async {
        // The loop is waiting once its pull request is at the server; the idle spell after
        // that, longer than the linger, is the scenario itself.
        let auth = bus.jetstream().get_stream("AUTH").await.expect("AUTH");
        vault_testkit::poll_until(Duration::from_secs(10), "the consumer loop to pull", || async {
            let info = auth.consumer_info("audit-auth").await.ok()?;
            (info.num_waiting >= 1).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // Sent back to back, acks awaited after: five publishes each awaiting its ack could
        // outlast the linger on a loaded machine and split the burst.
        let mut acks = Vec::new();
        for _ in 0..5 {
            acks.push(bus.start_publish(&auth_event(Uuid::now_v7()), &MessageContext::default()).await.expect("sent"));
        }
        for ack in acks {
            ack.await.expect("published");
        }
        let first =
            tokio::time::timeout(Duration::from_secs(10), batches.recv()).await.expect("a batch").expect("open");
        shutdown.cancel();
        first
    };
    let (consumed, first) = tokio::join!(consuming, driving);
    consumed.expect("stops cleanly");
    assert_eq!(first, 5, "the burst in one batch");
}

/// Parking keeps every message: a second, different message at a sequence already parked (a
/// stream re-created starts its sequences again) is stored beside the first, and the same
/// message parked again (its terminate lost, so it came back) is stored once. (Unique on the
/// sequence alone, the second was counted and logged as parked, terminated, and stored nowhere.)
#[tokio::test]
async fn parking_keeps_every_message_and_the_same_message_once() {
    use async_nats::jetstream::{consumer::pull, stream};
    let (nats, db) = (NatsServer::start().await, vault_testkit::TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    let js = bus.jetstream();
    let config = stream::Config { name: "SCRATCH".into(), subjects: vec!["scratch.>".into()], ..Default::default() };
    let mut parked = Vec::new();
    for payload in ["first poison", "second poison"] {
        let stream = js.get_or_create_stream(config.clone()).await.expect("stream");
        js.publish("scratch.x", payload.into()).await.expect("sent").await.expect("stored");
        let consumer = stream
            .create_consumer(pull::Config { durable_name: Some("c".into()), ..Default::default() })
            .await
            .expect("consumer");
        let mut batch = consumer.fetch().max_messages(1).messages().await.expect("fetch");
        let msg = batch.next().await.expect("a message").expect("no error");
        assert_eq!(msg.info().expect("info").stream_sequence, 1);
        vault_bus::park::park(&pool, "SCRATCH", "c", &msg, "poison").await.expect("parked");
        parked.push(msg);
        js.delete_stream("SCRATCH").await.expect("deleted");
    }
    vault_bus::park::park(&pool, "SCRATCH", "c", &parked[0], "poison").await.expect("parked again");
    let payloads: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM parked_messages WHERE stream = 'SCRATCH' ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("rows");
    assert_eq!(payloads, vec![b"first poison".to_vec(), b"second poison".to_vec()]);
}
