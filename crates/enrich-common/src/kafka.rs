//! Kafka clients configured the same way in every stage, and the batch-reading helper.

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::Offset;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::config::{ConsumerTuning, Settings};

/// Bootstrap servers plus every pass-through librdkafka property (`kafka.client`).
pub fn base_config(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.kafka.bootstrap_servers);
    for (key, value) in &settings.kafka.client {
        config.set(key, value);
    }
    config
}

/// Whether `e` (or its cause) is the producer refusing a record as larger than it or
/// the broker accepts (`MSG_SIZE_TOO_LARGE`, at enqueue or at delivery): sending it
/// again can never succeed.
pub fn is_too_large(e: &anyhow::Error) -> bool {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<KafkaError>(),
            Some(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge))
        )
    })
}

/// How a consumer's offsets reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetCommit {
    /// Stored by the stage only after the work they cover is durable, committed in the
    /// background and on shutdown.
    Stored,
    /// Committed inside the stage's Kafka transactions (`send_offsets_to_transaction`).
    Transactional,
}

/// A consumer that reads only committed records and never commits on its own what the
/// stage has not finished.
pub fn consumer(
    settings: &Settings,
    group_id: &str,
    client_id: &str,
    commit: OffsetCommit,
) -> KafkaResult<StreamConsumer> {
    consumer_with_context(settings, group_id, client_id, commit, rdkafka::consumer::DefaultConsumerContext)
}

/// [`consumer`] with a context of the stage's own (rebalance callbacks).
pub fn consumer_with_context<C: rdkafka::consumer::ConsumerContext + 'static>(
    settings: &Settings,
    group_id: &str,
    client_id: &str,
    commit: OffsetCommit,
    context: C,
) -> KafkaResult<StreamConsumer<C>> {
    let mut config = base_config(settings);
    let auto_commit = commit == OffsetCommit::Stored;
    config
        .set("group.id", group_id)
        .set("client.id", client_id)
        .set("enable.auto.commit", if auto_commit { "true" } else { "false" })
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.partition.eof", "false");
    override_from(&mut config, settings);
    config.create_with_context(context)
}

/// An idempotent producer (acks=all, no reordering on retry).
pub fn producer(settings: &Settings, client_id: &str) -> KafkaResult<FutureProducer> {
    let mut config = base_config(settings);
    config
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "120000");
    override_from(&mut config, settings);
    config.create()
}

/// Operator-given properties win over the stage's defaults.
pub fn override_from(config: &mut ClientConfig, settings: &Settings) {
    for (key, value) in &settings.kafka.client {
        config.set(key, value);
    }
}

/// Creates the topics that are missing (`kafka.partitions`, `kafka.replication_factor`),
/// when `kafka.create_topics` is on.
pub async fn ensure_topics(settings: &Settings, topics: &[&str]) -> anyhow::Result<()> {
    if !settings.kafka.create_topics {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = base_config(settings).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(t, settings.kafka.partitions, TopicReplication::Fixed(settings.kafka.replication_factor))
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    // A topic just created can be missing from the metadata a consumer fetches when it
    // subscribes; it would then not be assigned before the next metadata refresh
    // (minutes). Wait until every topic shows its partitions with leaders.
    let config = base_config(settings);
    let names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let client: rdkafka::consumer::BaseConsumer = config.create()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for name in &names {
            loop {
                let visible = client.fetch_metadata(Some(name), Duration::from_secs(5)).is_ok_and(|m| {
                    m.topics().iter().any(|t| {
                        t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                });
                if visible {
                    break;
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "topic {name} not visible 30 s after creating it"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    })
    .await?
}

/// Waits for the first record (or shutdown), then gathers more until the batch is full
/// or `batch_linger_ms` has passed. Empty only when shutdown was requested.
pub async fn next_batch<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    tuning: ConsumerTuning,
    shutdown: &CancellationToken,
) -> Vec<OwnedMessage> {
    let mut batch = Vec::with_capacity(tuning.batch_size.min(1024));
    let mut bytes = 0;
    loop {
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return batch,
            m = consumer.recv() => m,
        };
        match received {
            Ok(m) => {
                bytes += weight(&m);
                batch.push(detach(&m));
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka consumer error");
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(tuning.batch_linger_ms);
    while batch.len() < tuning.batch_size && bytes < tuning.batch_max_bytes {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => {
                bytes += weight(&m);
                batch.push(detach(&m));
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            Err(_) => break,
        }
    }
    batch
}

/// How a topic whose records are smaller than the producer's must be met: refused at
/// start, or only warned of (the publisher's output topic: an output the broker refuses
/// there is dead-lettered `too_large`, one at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicLimit {
    Refuse,
    Warn,
}

/// Checks that each topic this stage writes to takes records as large as its producer
/// sends (`max.message.bytes` of the topic, as the broker reports it, at least the
/// producer's `message.max.bytes`). The broker refuses a whole produce batch over the
/// topic's limit, and the byte budget knows only the producer's: below it, ingest would
/// retry a refused forward for ever and the enricher dead-letter every result of a
/// refused batch. A topic the broker does not describe (no rights to) is let through.
pub async fn check_topic_limits(settings: &Settings, topics: &[(&str, TopicLimit)]) -> anyhow::Result<()> {
    use rdkafka::admin::ResourceSpecifier;
    let producer = settings.kafka.message_max_bytes();
    let admin: AdminClient<DefaultClientContext> = base_config(settings).create()?;
    let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|(t, _)| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = match admin.describe_configs(&specs, &opts).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the topics' max.message.bytes; not checked");
            return Ok(());
        }
    };
    for ((topic, limit), result) in topics.iter().zip(described) {
        let Ok(resource) = result else { continue };
        let Some(takes) = resource.get("max.message.bytes").and_then(|e| e.value.as_deref()?.parse::<usize>().ok())
        else {
            continue;
        };
        if takes >= producer {
            continue;
        }
        let why = format!(
            "topic {topic} takes records of at most {takes} bytes (its max.message.bytes), less than the producer sends \
             (kafka.client.message.max.bytes = {producer}): raise the topic's max.message.bytes or lower \
             kafka.client.message.max.bytes"
        );
        match limit {
            TopicLimit::Refuse => anyhow::bail!("invalid configuration: {why}"),
            TopicLimit::Warn => tracing::warn!("{why}; larger outputs are dead-lettered too_large"),
        }
    }
    Ok(())
}

/// The record, owned. A record whose headers librdkafka cannot read (more than 100,000 of
/// them, or malformed: `rd_kafka_message_headers` answers `BAD_MSG`) has no headers in
/// rdkafka's API, like a record without any; it is detached with an *empty* header list
/// instead, which no readable record has (librdkafka gives none for zero headers), so
/// [`crate::headers::collect_checked`] can say so and the record is not forwarded
/// without its headers as if it had none.
pub fn detach(m: &rdkafka::message::BorrowedMessage<'_>) -> OwnedMessage {
    let owned = m.detach();
    if owned.headers().is_some() || !headers_unreadable(m) {
        return owned;
    }
    owned.replace_headers(Some(rdkafka::message::OwnedHeaders::new()))
}

/// Whether librdkafka refuses to parse the record's headers. rdkafka answers `None`
/// for that and for no headers alike, so the one call that tells them apart is made here.
#[allow(unsafe_code)]
fn headers_unreadable(m: &rdkafka::message::BorrowedMessage<'_>) -> bool {
    let mut native = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is the live message `m` borrows; librdkafka only reads it and
    // writes the headers' pointer, which is not kept.
    let err = unsafe { rdkafka::bindings::rd_kafka_message_headers(m.ptr(), &mut native) };
    use rdkafka::bindings::rd_kafka_resp_err_t::{RD_KAFKA_RESP_ERR__NOENT, RD_KAFKA_RESP_ERR_NO_ERROR};
    // NOENT: no headers. Anything else (BAD_MSG past 100,000, UNDERFLOW for a cut header
    // block) is headers that exist and cannot be read.
    err != RD_KAFKA_RESP_ERR_NO_ERROR && err != RD_KAFKA_RESP_ERR__NOENT
}

/// What a record weighs in a batch: its value, key and headers (a header name that is
/// not UTF-8 is never read as text: rdkafka panics on one).
pub fn weight<M: Message>(m: &M) -> usize {
    m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len) + crate::headers::size(m.headers())
}

/// The next offset to read per partition after `messages`: what gets stored or committed.
pub fn next_offsets(messages: &[OwnedMessage]) -> BTreeMap<(String, i32), i64> {
    let mut next = BTreeMap::new();
    for m in messages {
        let entry = next.entry((m.topic().to_string(), m.partition())).or_insert(m.offset() + 1);
        *entry = (*entry).max(m.offset() + 1);
    }
    next
}

/// Stores (for the next background commit) the offsets after `messages`. Call only
/// once the work the messages stand for is durable.
pub fn store_offsets(consumer: &StreamConsumer, messages: &[OwnedMessage]) {
    for ((topic, partition), next) in next_offsets(messages) {
        // librdkafka takes the offset of the last processed record here and stores +1.
        if let Err(e) = consumer.store_offset(&topic, partition, next - 1) {
            // The partition was revoked meanwhile: its new owner re-reads the records.
            tracing::debug!(%topic, partition, error = %e, "offset not stored");
        }
    }
}

/// On shutdown: flushes the producer, then commits the stored offsets synchronously.
pub fn drain<C: rdkafka::consumer::ConsumerContext + 'static>(consumer: &StreamConsumer<C>, producer: &FutureProducer) {
    use rdkafka::consumer::CommitMode;
    use rdkafka::producer::Producer;
    if let Err(e) = producer.flush(rdkafka::util::Timeout::After(Duration::from_secs(10))) {
        tracing::warn!(error = %e, "producer flush on shutdown failed");
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("offsets committed on shutdown"),
        Err(e) => tracing::info!(error = %e, "no offsets to commit on shutdown"),
    }
}

/// Reports each assigned partition's lag (end of the partition minus the group's
/// committed offset, as `kafka-consumer-groups` shows it) into `enrich_consumer_lag`
/// every `every`, until `shutdown`. Off the consumer loop, on a blocking thread: a few
/// small requests to the broker per interval.
pub fn spawn_lag_reporter<C>(
    consumer: std::sync::Arc<rdkafka::consumer::StreamConsumer<C>>,
    metrics: crate::service::StageMetrics,
    every: Duration,
    shutdown: crate::shutdown::Shutdown,
) -> tokio::task::JoinHandle<()>
where
    C: rdkafka::consumer::ConsumerContext + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let c = consumer.clone();
            let lags = tokio::task::spawn_blocking(move || -> KafkaResult<Vec<(String, i32, i64)>> {
                let timeout = Duration::from_secs(5);
                let committed = c.committed(timeout)?;
                let mut lags = Vec::new();
                for e in committed.elements() {
                    let (low, high) = c.fetch_watermarks(e.topic(), e.partition(), timeout)?;
                    // Nothing committed yet: the whole partition is ahead.
                    let position = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => low,
                    };
                    lags.push((e.topic().to_string(), e.partition(), (high - position).max(0)));
                }
                Ok(lags)
            })
            .await;
            let Ok(Ok(lags)) = lags else { continue };
            metrics.consumer_lag.clear();
            for (topic, partition, lag) in lags {
                metrics
                    .consumer_lag
                    .get_or_create(&vec![("topic", topic), ("partition", partition.to_string())])
                    .set(lag);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::BaseProducer;

    fn settings(client: &[(&str, &str)]) -> Settings {
        let mut env: Vec<(String, String)> = vec![("ENRICH_KAFKA__BOOTSTRAP_SERVERS".into(), "127.0.0.1:1".into())];
        env.extend(client.iter().map(|(k, v)| (format!("ENRICH_KAFKA__CLIENT__{}", k.to_uppercase()), v.to_string())));
        Settings::from_toml(include_str!("../../../config/pipeline.toml"), env).unwrap()
    }

    /// The linked librdkafka accepts the TLS and SASL keys the README documents: a client
    /// is created with them (creating one does not connect).
    #[test]
    fn the_documented_tls_and_sasl_keys_are_built_in() {
        for (protocol, mechanism) in [
            ("SASL_SSL", "PLAIN"),
            ("SASL_SSL", "SCRAM-SHA-256"),
            ("SASL_SSL", "SCRAM-SHA-512"),
            ("SASL_PLAINTEXT", "PLAIN"),
        ] {
            let s = settings(&[
                ("security.protocol", protocol),
                ("sasl.mechanisms", mechanism),
                ("sasl.username", "u"),
                ("sasl.password", "p"),
                ("ssl.ca.location", "probe"),
                ("ssl.endpoint.identification.algorithm", "https"),
            ]);
            let created: KafkaResult<BaseProducer> = base_config(&s).create();
            assert!(created.is_ok(), "{protocol} {mechanism}: {:?}", created.err());
        }
        let s = settings(&[("security.protocol", "SSL"), ("ssl.ca.location", "probe")]);
        let created: KafkaResult<BaseProducer> = base_config(&s).create();
        assert!(created.is_ok(), "SSL: {:?}", created.err());
    }

    /// Kerberos needs librdkafka built with Cyrus SASL, which the images do not link: the
    /// client refuses at creation, so a stage stops at start instead of failing later.
    #[test]
    fn gssapi_is_not_built_in() {
        let s = settings(&[("security.protocol", "SASL_SSL"), ("sasl.mechanisms", "GSSAPI")]);
        let created: KafkaResult<BaseProducer> = base_config(&s).create();
        let err = created.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("No provider for SASL mechanism GSSAPI"), "GSSAPI accepted, or another error: {err:?}");
    }
}
