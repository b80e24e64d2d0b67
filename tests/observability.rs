//! Observability on the real stack: spans of every stage arrive at real OTLP receivers
//! inside this test binary (a gRPC TraceService, and an HTTP server decoding protobuf
//! `ExportTraceServiceRequest`s), each as one trace per event; `/metrics`
//! parses and counts the run; a key's history shows every stage with its steps and
//! tokens; log lines inside a record's span carry its trace id; old audit rows go.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use dlq_replayer::cli::Client;
use dlq_replayer::replay::Filter;
use enrich_common::telemetry::{Protocol, Telemetry, TraceExport};
use enrich_common::{TraceContext, headers};
use enrich_e2e::loadgen::accounting::account;
use enrich_e2e::loadgen::kafka_io::{Produced, header, produce_all, read_to_end};
use enrich_e2e::loadgen::traces::{Received, Store, attr, render, serve_otlp};
use enrich_e2e::loadgen::workload::{self, Kind, Record, Spec};
use enrich_e2e::{StageKind, TestEnv, count_in_states, wait_for};
use opentelemetry_proto::tonic::trace::v1::Span;
use rdkafka::Message;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);
const CONSUMER: i32 = 5;
const PRODUCER: i32 = 4;
const CLIENT: i32 = 3;

/// The OTLP receivers (one per protocol) and the process's tracer provider exporting every
/// span to both, alive for the whole test binary (on a runtime of their own: each test has
/// its own).
struct Collector {
    grpc: Store,
    http: Store,
    telemetry: Telemetry,
}

fn collector() -> &'static Collector {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                let (grpc, http) = (Store::new(1_000_000), Store::new(1_000_000));
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let grpc_addr = listener.local_addr().unwrap();
                let _grpc = serve_otlp(listener, grpc.clone());
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let http_addr = listener.local_addr().unwrap();
                let _http = tokio::spawn(serve_otlp_http(listener, http.clone()));
                // Built inside a runtime, as every stage's main does.
                let exports = [
                    TraceExport { endpoint: format!("http://{grpc_addr}"), protocol: Protocol::Grpc },
                    TraceExport { endpoint: format!("http://{http_addr}"), protocol: Protocol::HttpProtobuf },
                ];
                let telemetry = enrich_common::telemetry::install_tracer("enrich-e2e", &exports).unwrap();
                tx.send(Collector { grpc, http, telemetry }).unwrap();
                std::future::pending::<()>().await;
            });
        });
        rx.recv().unwrap()
    })
}

/// The collector's OTLP/HTTP traces endpoint: a protobuf `ExportTraceServiceRequest` in,
/// a protobuf `ExportTraceServiceResponse` out; anything else is refused.
async fn serve_otlp_http(listener: tokio::net::TcpListener, store: Store) {
    use axum::http::{HeaderMap, StatusCode, header::CONTENT_TYPE};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use prost::Message;
    let export = move |headers: HeaderMap, body: axum::body::Bytes| async move {
        let protobuf = headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
        if !protobuf {
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, [(CONTENT_TYPE, "text/plain")], Vec::new());
        }
        match ExportTraceServiceRequest::decode(body) {
            Ok(request) => {
                store.ingest(request);
                let answer = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
                (StatusCode::OK, [(CONTENT_TYPE, "application/x-protobuf")], answer)
            }
            Err(_) => (StatusCode::BAD_REQUEST, [(CONTENT_TYPE, "text/plain")], Vec::new()),
        }
    };
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(export));
    axum::serve(listener, app).await.unwrap();
}

impl Collector {
    fn store(&self, protocol: Protocol) -> &Store {
        match protocol {
            Protocol::Grpc => &self.grpc,
            Protocol::HttpProtobuf => &self.http,
        }
    }

    /// Exports what the batch processors hold, then returns the spans of `trace` the
    /// receiver of `protocol` has.
    async fn trace_over(&'static self, protocol: Protocol, trace: [u8; 16]) -> Vec<Received> {
        tokio::task::spawn_blocking(move || self.telemetry.flush()).await.unwrap();
        self.store(protocol).trace(&trace)
    }

    /// The spans of `trace`, as the gRPC receiver has them.
    async fn trace(&'static self, trace: [u8; 16]) -> Vec<Received> {
        self.trace_over(Protocol::Grpc, trace).await
    }
}

/// The one span of `trace` made by `scope` with this kind and parent, if exactly one.
fn one<'a>(spans: &'a [Received], scope: &str, kind: i32, parent: &[u8]) -> Option<&'a Span> {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|r| r.scope == scope && r.span.kind == kind && r.span.parent_span_id == parent)
        .map(|r| &r.span)
        .collect();
    (found.len() == 1).then(|| found[0])
}

/// Tickets with a fresh `traceparent` each.
async fn produce_traced(env: &TestEnv, records: &[Record]) -> anyhow::Result<Vec<Produced>> {
    produce_all(&env.settings, env.source_topic(), records, |_| true, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_event_is_one_trace_from_ingest_through_enricher_to_publisher_over_grpc() -> anyhow::Result<()> {
    each_event_is_one_trace(Protocol::Grpc).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_event_is_one_trace_from_ingest_through_enricher_to_publisher_over_http_protobuf() -> anyhow::Result<()> {
    each_event_is_one_trace(Protocol::HttpProtobuf).await
}

/// Every span of every record's chain reaches the receiver of `protocol`.
async fn each_event_is_one_trace(protocol: Protocol) -> anyhow::Result<()> {
    const N: usize = 20;
    let collector = collector();
    let overrides =
        [("ENRICH_LLM__INPUT_USD_PER_MTOK", "0.5".to_string()), ("ENRICH_LLM__OUTPUT_USD_PER_MTOK", "1.5".to_string())];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_traced(&env, &records).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    wait_for("every ticket to be published", DEADLINE, || async {
        Ok((count_in_states(&env, &["published"]).await? == N as i64).then_some(()))
    })
    .await?;
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert_eq!(output.len(), N);
    let outputs: HashMap<Vec<u8>, TraceContext> = output
        .iter()
        .map(|m| {
            let tp = header(m, headers::TRACEPARENT).expect("a traceparent on the output");
            (m.key().unwrap().to_vec(), TraceContext::parse(&tp, None).unwrap())
        })
        .collect();
    let s = &env.settings;
    let topics = &s.topics;

    for (record, sent) in records.iter().zip(&produced) {
        let source = sent.trace.clone().expect("the test set a traceparent");
        // The last spans end just after the output commits: look until the chain is whole.
        let chain = wait_for("the record's whole trace", DEADLINE, || async {
            let spans = collector.trace_over(protocol, source.trace_id).await;
            let Some(ingest) = one(&spans, "ingest-dedup", CONSUMER, &source.span_id) else { return Ok(None) };
            let Some(forward) = one(&spans, "ingest-dedup", PRODUCER, &ingest.span_id) else { return Ok(None) };
            let Some(enricher) = one(&spans, "enricher", CONSUMER, &forward.span_id) else { return Ok(None) };
            let Some(call) = one(&spans, "enricher", CLIENT, &enricher.span_id) else { return Ok(None) };
            let Some(result) = one(&spans, "enricher", PRODUCER, &enricher.span_id) else { return Ok(None) };
            let Some(publisher) = one(&spans, "publisher", CONSUMER, &result.span_id) else { return Ok(None) };
            let Some(out) = one(&spans, "publisher", PRODUCER, &publisher.span_id) else { return Ok(None) };
            let claim = spans.iter().any(|r| r.span.name == "dedup claim" && r.span.parent_span_id == ingest.span_id);
            Ok(claim.then(|| [ingest, forward, enricher, call, result, publisher, out].map(Clone::clone).to_vec()))
        })
        .await?;
        let [ingest, forward, enricher, call, result, publisher, out] = <[Span; 7]>::try_from(chain).unwrap();

        // The source's context is the parent of ingest's span, and a link of it.
        assert!(ingest.links.iter().any(|l| l.span_id == source.span_id && l.trace_id == source.trace_id));
        let key = format!("{}:{}", s.pipeline.name, record.ticket.as_ref().unwrap().id);
        for (span, topic, group) in [
            (&ingest, env.source_topic().to_string(), s.group_id(enrich_common::config::Stage::Ingest)),
            (&enricher, topics.requests.clone(), s.group_id(enrich_common::config::Stage::Enricher)),
            (&publisher, topics.results.clone(), s.group_id(enrich_common::config::Stage::Publisher)),
        ] {
            assert_eq!(attr(span, "messaging.system").as_deref(), Some("kafka"));
            assert_eq!(attr(span, "messaging.destination.name"), Some(topic));
            assert!(attr(span, "messaging.destination.partition.id").is_some());
            assert!(attr(span, "messaging.kafka.offset").is_some());
            assert_eq!(attr(span, "messaging.consumer.group.name"), Some(group));
            assert_eq!(attr(span, "enrich.idempotency_key").as_deref(), Some(key.as_str()));
        }
        assert_eq!(
            attr(&ingest, "messaging.kafka.message.key").as_deref(),
            record.ticket.as_ref().map(|t| t.id.as_str())
        );
        assert_eq!(attr(&ingest, "messaging.kafka.offset"), Some(sent.offset.to_string()));
        assert_eq!(attr(&forward, "messaging.destination.name"), Some(topics.requests.clone()));
        assert_eq!(attr(&result, "messaging.destination.name"), Some(topics.results.clone()));
        assert_eq!(attr(&out, "messaging.destination.name"), Some(topics.output.clone()));
        // The LLM call, with the GenAI conventions and the product's own attributes.
        assert_eq!(attr(&call, "gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(attr(&call, "gen_ai.provider.name").as_deref(), Some("openai"));
        assert_eq!(attr(&call, "gen_ai.request.model"), Some(s.llm.model.clone()));
        assert_eq!(attr(&call, "gen_ai.response.model"), Some(s.llm.model.clone()));
        let tokens_in: u64 = attr(&call, "gen_ai.usage.input_tokens").unwrap().parse()?;
        let tokens_out: u64 = attr(&call, "gen_ai.usage.output_tokens").unwrap().parse()?;
        assert!(tokens_in > 0 && tokens_out > 0);
        let cost: f64 = attr(&call, "enrich.cost_usd").unwrap().parse()?;
        let expected = (tokens_in as f64 * 0.5 + tokens_out as f64 * 1.5) / 1e6;
        assert!((cost - expected).abs() < 1e-12, "cost {cost} vs {expected}");
        assert_eq!(attr(&call, "enrich.attempt").as_deref(), Some("1"));
        assert!(attr(&call, "gen_ai.input.messages").is_none(), "no prompt text unless telemetry.capture_content");
        // The output record continues the same trace from the publisher's send span.
        let written = &outputs[&record.key.clone().unwrap()];
        assert_eq!(written.trace_id, source.trace_id);
        assert_eq!(written.span_id.to_vec(), out.span_id);
    }
    // `loadgen traces` draws the same trace as a tree, stage after stage.
    let first = produced[0].trace.clone().unwrap();
    let drawn = render(&collector.trace_over(protocol, first.trace_id).await);
    let position = |what: &str| drawn.find(what).unwrap_or_else(|| panic!("{what} in\n{drawn}"));
    assert!(position("ingest-dedup") < position("enricher") && position("enricher") < position("publisher"), "{drawn}");
    assert!(drawn.contains(&format!("trace {}", first.trace_id_hex())));
    // Only the product's spans: none from the exporter's own gRPC traffic.
    let scopes: std::collections::BTreeSet<String> =
        collector.store(protocol).all().iter().map(|r| r.scope.clone()).collect();
    assert!(
        scopes.iter().all(|s| ["ingest-dedup", "enricher", "publisher", "dlq-replayer"].contains(&s.as_str())),
        "{scopes:?}"
    );
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delayed_retry_and_a_replayed_dead_letter_stay_in_their_records_traces() -> anyhow::Result<()> {
    let collector = collector();
    let port = enrich_e2e::free_port()?;
    let token = "trace-token-0123456789".to_string();
    let overrides = [
        // Every retry goes through the retry topic.
        ("ENRICH_LLM__QUICK_RETRIES", "0".to_string()),
        ("ENRICH_LLM__MAX_ATTEMPTS", "2".to_string()),
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", port.to_string()),
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", token.clone()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records = workload::marked_tickets(&env.id, 4, &[(1, "500-once"), (2, "always-500")]);
    let produced = produce_traced(&env, &records).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));
    let pipeline = env.settings.pipeline.name.clone();
    wait_for("three published, one dead-lettered", DEADLINE, || async {
        let a = account(&env.pool, &pipeline, env.source_topic(), &produced).await?;
        Ok((a.published == 3 && a.dead_lettered_at_enricher == 1).then_some(()))
    })
    .await?;
    let topics = env.settings.topics.clone();

    // The retried record: requests → retry topic → enricher again → publisher, one trace.
    let retried = produced[1].trace.clone().unwrap();
    wait_for("the retried record's trace", DEADLINE, || async {
        let spans = collector.trace(retried.trace_id).await;
        let to_retry = spans.iter().find(|r| {
            r.span.kind == PRODUCER && attr(&r.span, "messaging.destination.name").as_deref() == Some(&topics.retry)
        });
        let Some(to_retry) = to_retry else { return Ok(None) };
        let Some(again) = one(&spans, "enricher", CONSUMER, &to_retry.span.span_id) else { return Ok(None) };
        assert_eq!(attr(again, "messaging.destination.name"), Some(topics.retry.clone()));
        let Some(result) = one(&spans, "enricher", PRODUCER, &again.span_id) else { return Ok(None) };
        Ok(one(&spans, "publisher", CONSUMER, &result.span_id).map(|_| ()))
    })
    .await?;

    // The dead letter, replayed once the cause is gone: the replay is a child (and a
    // link) of the span that dead-lettered it, and the rest follows in the same trace.
    env.sim.set_faults(llm_sim::Faults { markers: false, ..Default::default() });
    let client = Client::new(format!("http://127.0.0.1:{port}"), Some(token));
    let by_reason = Filter { reason: Some("max_attempts".into()), ..Default::default() };
    let done = wait_for("the dlq-replayer API", DEADLINE, || async {
        Ok(client.replay(&by_reason, false, Some("trace test")).await.ok())
    })
    .await?;
    assert_eq!(done.replayed.len(), 1);
    let dead = produced[2].trace.clone().unwrap();
    wait_for("the replayed record's trace", DEADLINE, || async {
        let spans = collector.trace(dead.trace_id).await;
        let to_dlq = spans.iter().find(|r| {
            r.span.kind == PRODUCER && attr(&r.span, "messaging.destination.name").as_deref() == Some(&topics.dlq)
        });
        let Some(to_dlq) = to_dlq else { return Ok(None) };
        let replay = spans.iter().find(|r| r.scope == "dlq-replayer" && r.span.name == "replay");
        let Some(replay) = replay else { return Ok(None) };
        assert_eq!(replay.span.parent_span_id, to_dlq.span.span_id);
        assert!(replay.span.links.iter().any(|l| l.span_id == to_dlq.span.span_id));
        let Some(resend) = one(&spans, "dlq-replayer", PRODUCER, &replay.span.span_id) else { return Ok(None) };
        let Some(again) = one(&spans, "enricher", CONSUMER, &resend.span_id) else { return Ok(None) };
        let Some(result) = one(&spans, "enricher", PRODUCER, &again.span_id) else { return Ok(None) };
        Ok(one(&spans, "publisher", CONSUMER, &result.span_id).map(|_| ()))
    })
    .await?;
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_count_the_run_and_the_history_shows_every_stage() -> anyhow::Result<()> {
    const UNIQUE: usize = 40;
    const DUPLICATES: usize = 10;
    collector();
    let ports: Vec<u16> = (0..4).map(|_| enrich_e2e::free_port()).collect::<Result<_, _>>()?;
    let overrides = [
        ("ENRICH_INGEST__HTTP_PORT", ports[0].to_string()),
        ("ENRICH_ENRICHER__HTTP_PORT", ports[1].to_string()),
        ("ENRICH_PUBLISHER__HTTP_PORT", ports[2].to_string()),
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", ports[3].to_string()),
        ("ENRICH_LLM__INPUT_USD_PER_MTOK", "2".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records = workload::build(&Spec { run: env.id.clone(), unique: UNIQUE, duplicates: DUPLICATES, malformed: 3 });
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));
    let pipeline = env.settings.pipeline.name.clone();
    env.wait_accounted(&produced, DEADLINE).await?;
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    wait_for("the publisher to commit", DEADLINE, || async {
        Ok(enrich_e2e::loadgen::kafka_io::group_caught_up(&env.settings, &group, &env.settings.topics.results)?
            .then_some(()))
    })
    .await?;
    let scrape = enrich_e2e::scrape_metrics;
    let (ingest, enricher, publisher) = (scrape(ports[0]).await?, scrape(ports[1]).await?, scrape(ports[2]).await?);
    let topics = &env.settings.topics;
    let get = |m: &HashMap<String, f64>, series: &str| m.get(series).copied().unwrap_or_else(|| panic!("{series}"));
    let total = (UNIQUE + DUPLICATES + 3) as f64;
    assert_eq!(get(&ingest, &format!("enrich_records_consumed_total{{topic=\"{}\"}}", env.source_topic())), total);
    assert_eq!(get(&ingest, "enrich_ingest_records_total{outcome=\"duplicate\"}"), DUPLICATES as f64);
    assert_eq!(get(&ingest, &format!("enrich_records_produced_total{{topic=\"{}\"}}", topics.requests)), UNIQUE as f64);
    assert_eq!(get(&ingest, &format!("enrich_records_produced_total{{topic=\"{}\"}}", topics.dlq)), 3.0);
    let by_reason: f64 =
        ingest.iter().filter(|(k, _)| k.starts_with("enrich_dead_letters_total{reason=")).map(|(_, v)| v).sum();
    assert_eq!(by_reason, 3.0, "dead letters by reason add up");
    assert_eq!(get(&enricher, "enrich_llm_calls_total{outcome=\"ok\"}"), UNIQUE as f64);
    assert_eq!(get(&enricher, "enrich_llm_latency_seconds_count"), UNIQUE as f64);
    let (sim_in, sim_out) = env.sim.tokens();
    assert_eq!(get(&enricher, "enrich_llm_tokens_total{direction=\"input\"}"), sim_in as f64);
    assert_eq!(get(&enricher, "enrich_llm_tokens_total{direction=\"output\"}"), sim_out as f64);
    assert!((get(&enricher, "enrich_llm_cost_usd_total") - sim_in as f64 * 2.0 / 1e6).abs() < 1e-9);
    assert_eq!(get(&enricher, "enrich_in_flight"), 0.0);
    assert_eq!(get(&enricher, "enrich_llm_cache_hits_total"), 0.0, "no key was enriched twice");
    assert_eq!(get(&enricher, "enrich_paused"), 0.0);
    assert_eq!(get(&enricher, "enrich_llm_breaker_open"), 0.0);
    assert_eq!(get(&publisher, "enrich_publisher_records_total{outcome=\"published\"}"), UNIQUE as f64);
    assert_eq!(get(&publisher, "enrich_end_to_end_latency_seconds_count"), UNIQUE as f64);
    assert_eq!(
        get(&publisher, &format!("enrich_records_produced_total{{topic=\"{}\"}}", topics.output)),
        UNIQUE as f64
    );
    // Lag is reported per partition once the reporter has run; at the end of the run it is 0.
    let lag = wait_for("consumer lag to be reported", DEADLINE, || async {
        let m = scrape(ports[2]).await?;
        let lags: Vec<f64> = m.iter().filter(|(k, _)| k.starts_with("enrich_consumer_lag{")).map(|(_, v)| *v).collect();
        Ok((!lags.is_empty()).then_some(lags))
    })
    .await?;
    assert!(lag.iter().all(|l| *l == 0.0), "{lag:?}");

    // The history of one key: each stage's run, the steps, the tokens llm-sim reported.
    let client = Client::new(format!("http://127.0.0.1:{}", ports[3]), None);
    let mut tokens = (0i64, 0i64);
    for r in records.iter().filter(|r| r.kind == Kind::Unique) {
        let key = format!("{}:{}", pipeline, r.ticket.as_ref().unwrap().id);
        let h = client.history(&key).await?;
        assert_eq!(h.state.as_deref(), Some("published"));
        let stages: Vec<(&str, &str)> = h.runs.iter().map(|r| (r.stage.as_str(), r.status.as_str())).collect();
        for expected in [("ingest-dedup", "forwarded"), ("enricher", "enriched"), ("publisher", "published")] {
            assert!(stages.contains(&expected), "{key}: {stages:?}");
        }
        // The forwarded record's trace runs through every stage (a duplicate's sighting
        // has a trace of its own).
        let owner = h.runs.iter().find(|r| r.stage == "ingest-dedup" && r.status == "forwarded").unwrap();
        assert!(h.runs.iter().filter(|r| r.stage != "ingest-dedup").all(|r| r.trace_id == owner.trace_id));
        assert!(h.trace_ids.contains(owner.trace_id.as_ref().unwrap()));
        let call = h.steps.iter().find(|s| s.step == "llm_call" && s.status == "ok").expect("the call");
        assert_eq!(call.model.as_deref(), Some(env.settings.llm.model.as_str()));
        assert!(h.steps.iter().any(|s| s.step == "validation" && s.status == "ok"));
        tokens.0 += h.tokens.input;
        tokens.1 += h.tokens.output;
    }
    assert_eq!(tokens, (sim_in as i64, sim_out as i64), "the history's tokens are llm-sim's");
    let unknown = client.history("no-such-key").await.unwrap_err();
    assert!(unknown.to_string().contains("404"), "{unknown}");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_lines_inside_a_records_span_carry_its_trace_id() -> anyhow::Result<()> {
    use std::io::BufRead;
    let overrides = [("ENRICH_LLM__MAX_ATTEMPTS", "1".to_string())];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records = workload::marked_tickets(&env.id, 3, &[(1, "always-500")]);
    let produced = produce_traced(&env, &records).await?;
    let stages = [StageKind::Ingest, StageKind::Publisher].map(|k| env.spawn(k));
    // The enricher as a process, its JSON log lines read from its stdout.
    let mut enricher = env.spawn_process_logged("enricher")?;
    let stdout = enricher.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let poison = produced[1].trace.clone().unwrap();
    let key = format!("{}:{}", env.settings.pipeline.name, records[1].ticket.as_ref().unwrap().id);
    let line = wait_for("the enricher to log the dead letter", DEADLINE, || async {
        Ok(rx.try_iter().find(|l| l.contains("dead-lettered") && l.contains(&key)))
    })
    .await?;
    let _ = enricher.kill();
    let _ = enricher.wait();
    for s in stages {
        s.stop().await?;
    }
    let json: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(json["trace_id"].as_str(), Some(poison.trace_id_hex().as_str()), "{line}");
    let span_id = json["span_id"].as_str().expect("a span id");
    assert_eq!(span_id.len(), 16);
    assert_ne!(span_id, hex_span(&poison), "the enricher's own span, not the source's");
    env.teardown().await;
    Ok(())
}

fn hex_span(t: &TraceContext) -> String {
    t.traceparent().split('-').nth(2).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rows_past_the_retention_age_are_deleted_in_batches() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let pipeline = env.settings.pipeline.name.clone();
    for (age_days, n) in [(40, 12_000), (2, 5)] {
        sqlx::query(
            "INSERT INTO run_history (pipeline, idempotency_key, stage, status, recorded_at)
             SELECT $1, 'k' || g, 'enricher', 'enriched', now() - make_interval(days => $2) FROM generate_series(1, $3) g",
        )
        .bind(&pipeline)
        .bind(age_days)
        .bind(n)
        .execute(&env.pool)
        .await?;
        sqlx::query(
            "INSERT INTO step_outcomes (pipeline, idempotency_key, stage, step, status, recorded_at)
             SELECT $1, 'k' || g, 'enricher', 'llm_call', 'ok', now() - make_interval(days => $2) FROM generate_series(1, $3) g",
        )
        .bind(&pipeline)
        .bind(age_days)
        .bind(n)
        .execute(&env.pool)
        .await?;
    }
    // Another pipeline's rows are not this job's.
    sqlx::query("INSERT INTO run_history (pipeline, idempotency_key, stage, status, recorded_at) VALUES ('other', 'k', 'enricher', 'enriched', now() - interval '400 days')")
        .execute(&env.pool)
        .await?;
    let purged = dlq_replayer::retention::purge(&env.pool, &pipeline, Duration::from_secs(30 * 86_400)).await?;
    assert_eq!((purged.runs, purged.steps), (12_000, 12_000));
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM run_history").fetch_one(&env.pool).await?;
    assert_eq!(left, 5 + 1);
    let (steps_left,): (i64,) = sqlx::query_as("SELECT count(*) FROM step_outcomes").fetch_one(&env.pool).await?;
    assert_eq!(steps_left, 5);
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_record_read_again_after_a_crash_continues_its_first_trace() -> anyhow::Result<()> {
    const N: usize = 3;
    collector();
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let records = enrich_e2e::loadgen::workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    // A first reading claimed the keys and died before its forward was done: its claims
    // are there, with the traceparent of the span that read each record.
    let pipeline = env.settings.pipeline.name.clone();
    let mut first = HashMap::new();
    for (record, p) in records.iter().zip(&produced) {
        let key = format!("{pipeline}:{}", record.ticket.as_ref().unwrap().id);
        let cx = TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None).unwrap();
        let cx = TraceContext { trace_id: rand::random(), ..cx };
        sqlx::query(
            "INSERT INTO enrich_state (pipeline, idempotency_key, state, source_topic, source_partition, source_offset, kafka_key, traceparent)
             VALUES ($1, $2, 'received', $3, $4, $5, $6, $7)",
        )
        .bind(&pipeline)
        .bind(&key)
        .bind(env.source_topic())
        .bind(p.partition)
        .bind(p.offset)
        .bind(record.key.clone())
        .bind(cx.traceparent())
        .execute(&env.pool)
        .await?;
        first.insert(key, cx);
    }
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(acct.published, N as i64, "{acct:?}");
    // Every run of each key, the request and the output are in the first reading's trace.
    for (key, cx) in &first {
        let traces: Vec<(String, String)> =
            sqlx::query_as("SELECT stage, trace_id FROM run_history WHERE pipeline = $1 AND idempotency_key = $2")
                .bind(&pipeline)
                .bind(key)
                .fetch_all(&env.pool)
                .await?;
        assert_eq!(traces.len(), 3, "{traces:?}");
        assert!(traces.iter().all(|(_, t)| *t == cx.trace_id_hex()), "{key}: {traces:?}");
        let spans = collector().trace(cx.trace_id).await;
        let resumed = spans.iter().find(|r| r.span.name == "process redelivered").expect("the continued span");
        assert_eq!(resumed.span.parent_span_id, cx.span_id.to_vec(), "a child of the first reading's span");
    }
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    for m in &output {
        let t = TraceContext::parse(&header(m, headers::TRACEPARENT).unwrap(), None).unwrap();
        assert!(first.values().any(|cx| cx.trace_id == t.trace_id), "the output continues the first trace");
    }
    env.teardown().await;
    Ok(())
}
