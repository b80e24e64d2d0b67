//! Docker Compose and Kubernetes files checked against what the code expects (no Docker
//! engine runs here): every stage present, images from the repository's Dockerfile,
//! ports, environment variables and topics matching the configuration the binaries read,
//! health checks pointing at endpoints that exist.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::Settings;
use enrich_common::config::Stage;
use serde_norway::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const STAGES: [&str; 4] = ["ingest-dedup", "enricher", "publisher", "dlq-replayer"];
const ENDPOINTS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            let mut v: Value = serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}"));
            // YAML merge keys (`<<: *anchor`), as docker compose applies them.
            v.apply_merge().unwrap_or_else(|e| panic!("{path}: {e}"));
            v
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn config() -> String {
    read("config/pipeline.toml")
}

/// The settings a container gets: the shipped file plus its ENRICH_* variables. Any
/// variable that names no configuration key, or a bad value, fails here.
fn settings_with(env: &BTreeMap<String, String>) -> Settings {
    let vars = env.iter().filter(|(k, _)| k.starts_with("ENRICH_")).map(|(k, v)| (k.clone(), v.clone()));
    Settings::from_toml(&config(), vars).unwrap_or_else(|e| panic!("environment {env:?}: {e}"))
}

fn port_of(settings: &Settings, stage: &str) -> u16 {
    match stage {
        "ingest-dedup" => settings.ingest.http_port,
        "enricher" => settings.enricher.http_port,
        "publisher" => settings.publisher.http_port,
        "dlq-replayer" => settings.dlq_replayer.http_port,
        other => panic!("unknown stage {other}"),
    }
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => return None,
                    };
                    Some((k.as_str()?.to_string(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The binaries the workspace builds (each crate's package name).
fn workspace_binaries() -> Vec<String> {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            let member = m.as_str()?;
            let crate_dir = root().join(member);
            crate_dir.join("src/main.rs").exists().then(|| {
                let pkg: toml::Table =
                    toml::from_str(&std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap()).unwrap();
                pkg["package"]["name"].as_str().unwrap().to_string()
            })
        })
        .collect()
}

#[test]
fn the_dockerfile_builds_every_binary_it_can_be_asked_for() {
    let dockerfile = read("Dockerfile");
    for binary in workspace_binaries() {
        assert!(dockerfile.contains(&binary), "the Dockerfile copies {binary}");
    }
    assert!(dockerfile.contains("USER 10001"), "images run as a non-root user");
    assert!(dockerfile.contains("ARG BINARY"), "one binary per image, chosen by BINARY");
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target"));
}

#[test]
fn compose_runs_every_stage_from_the_repository_dockerfile_with_matching_settings() {
    let compose = yaml_docs("docker-compose.yml").remove(0);
    let services = compose["services"].as_mapping().expect("services");
    let binaries = workspace_binaries();
    for required in ["kafka", "postgres", "jaeger", "prometheus", "grafana", "setup", "llm-sim", "producer"]
        .into_iter()
        .chain(STAGES)
    {
        assert!(services.contains_key(required), "compose has {required}");
    }
    let prometheus = read("deploy/prometheus/prometheus.yml");
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if let Some(build) = service.get("build") {
            assert_eq!(build["context"].as_str(), Some("."), "{name} builds from the repository");
            assert_eq!(build["dockerfile"].as_str(), Some("Dockerfile"), "{name} uses the repository's Dockerfile");
            let binary = build["args"]["BINARY"].as_str().expect("BINARY build argument");
            assert!(binaries.iter().any(|b| b == binary), "{name}: {binary} is a workspace binary");
        }
        let env = str_map(&service["environment"]);
        let settings = settings_with(&env);
        if !STAGES.contains(&name) {
            continue;
        }
        assert_eq!(service["build"]["args"]["BINARY"].as_str(), Some(name), "the {name} service runs {name}");
        let port = port_of(&settings, name);
        let check: Vec<String> = service["healthcheck"]["test"]
            .as_sequence()
            .expect("a health check")
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let url = check.iter().find(|a| a.starts_with("http://")).expect("the health check probes a URL");
        assert!(url.starts_with(&format!("http://127.0.0.1:{port}/")), "{name} health check on its port {port}: {url}");
        assert!(ENDPOINTS.iter().any(|e| url.ends_with(e)), "{name} health check on an endpoint that exists: {url}");
        assert!(prometheus.contains(&format!("{name}\"]")) || prometheus.contains(&format!("\"{name}:{port}\"")));
        assert!(prometheus.contains(&port.to_string()), "Prometheus scrapes {name} on {port}");
        assert_eq!(settings.kafka.bootstrap_servers, "kafka:9092", "{name} reaches the compose broker");
    }
    // The enricher scales alone: no fixed name, no host port.
    let enricher = &services["enricher"];
    assert!(enricher.get("container_name").is_none());
    assert!(enricher.get("ports").is_none());
    assert!(services.values().all(|s| s.get("container_name").is_none()));
    // The sim answers where the stages look for it.
    let sim_args: Vec<&str> =
        services["llm-sim"]["command"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    let stage_env = str_map(&services["enricher"]["environment"]);
    let sim_port = sim_args[sim_args.iter().position(|a| *a == "--port").unwrap() + 1];
    assert_eq!(stage_env["ENRICH_LLM__BASE_URL"], format!("http://llm-sim:{sim_port}/v1"));
    for volume in ["kafka-data", "pg-data"] {
        assert!(compose["volumes"].get(volume).is_some(), "named volume {volume}");
    }
}

#[test]
fn the_grafana_dashboard_only_plots_metrics_the_stages_export() {
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/dashboards/enrich.json")).unwrap();
    let sources: String = [
        "crates/enrich-common/src/service.rs",
        "crates/ingest-dedup/src/metrics.rs",
        "crates/enricher/src/metrics.rs",
        "crates/publisher/src/metrics.rs",
    ]
    .iter()
    .map(|p| read(p))
    .collect();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(!panels.is_empty());
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("enrich_"))
            {
                let base = name.trim_end_matches("_total").trim_end_matches("_bucket");
                assert!(sources.contains(&format!("\"{base}\"")), "{name} in the dashboard is exported by a stage");
            }
        }
    }
}

#[test]
fn kubernetes_manifests_match_the_configuration() {
    assert_eq!(
        read("deploy/k8s/pipeline.toml"),
        config(),
        "deploy/k8s/pipeline.toml is a copy of config/pipeline.toml"
    );
    let kustomization = yaml_docs("deploy/k8s/kustomization.yaml").remove(0);
    let mut env = BTreeMap::new();
    for generator in kustomization["configMapGenerator"].as_sequence().unwrap() {
        for literal in generator.get("literals").and_then(Value::as_sequence).into_iter().flatten() {
            let (k, v) = literal.as_str().unwrap().split_once('=').unwrap();
            env.insert(k.to_string(), v.to_string());
        }
    }
    let mut docs = Vec::new();
    for resource in kustomization["resources"].as_sequence().unwrap() {
        docs.extend(yaml_docs(&format!("deploy/k8s/{}", resource.as_str().unwrap())));
    }
    for doc in &docs {
        if doc["kind"].as_str() == Some("Secret") {
            env.extend(str_map(&doc["stringData"]));
        }
    }
    let settings = settings_with(&env);

    let workloads: Vec<&Value> =
        docs.iter().filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet"))).collect();
    for stage in STAGES.iter().copied().chain(["llm-sim"]) {
        let w = workloads
            .iter()
            .find(|w| w["metadata"]["name"].as_str() == Some(stage))
            .unwrap_or_else(|| panic!("{stage}"));
        let container = &w["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["image"].as_str(), Some(format!("kafka-llm-enrich/{stage}").as_str()));
        let port = container["ports"][0]["containerPort"].as_u64().unwrap() as u16;
        let expected = if stage == "llm-sim" { 8080 } else { port_of(&settings, stage) };
        assert_eq!(port, expected, "{stage} container port");
        for (probe, path) in
            [("livenessProbe", "/healthz"), ("readinessProbe", if stage == "llm-sim" { "/healthz" } else { "/readyz" })]
        {
            assert_eq!(container[probe]["httpGet"]["path"].as_str(), Some(path), "{stage} {probe}");
        }
        assert!(container["resources"]["limits"]["memory"].is_string(), "{stage} has a memory limit");
    }
    let publisher = workloads.iter().find(|w| w["metadata"]["name"].as_str() == Some("publisher")).unwrap();
    assert_eq!(publisher["kind"].as_str(), Some("StatefulSet"), "stable transactional ids");

    let scaled = docs.iter().find(|d| d["kind"].as_str() == Some("ScaledObject")).expect("a KEDA ScaledObject");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"].as_str(), Some("enricher"));
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("kafka"));
    assert_eq!(trigger["metadata"]["topic"].as_str(), Some(settings.topics.requests.as_str()));
    assert_eq!(trigger["metadata"]["consumerGroup"].as_str(), Some(settings.group_id(Stage::Enricher).as_str()));
    assert_eq!(trigger["metadata"]["bootstrapServers"].as_str(), Some(settings.kafka.bootstrap_servers.as_str()));
    let max = scaled["spec"]["maxReplicaCount"].as_i64().unwrap();
    assert!(max <= i64::from(settings.kafka.partitions), "no more enrichers than partitions");
    assert!(
        docs.iter()
            .any(|d| d["kind"].as_str() == Some("PodDisruptionBudget")
                && d["metadata"]["name"].as_str() == Some("enricher")),
        "a PodDisruptionBudget for the enricher"
    );
    let job = docs.iter().find(|d| d["kind"].as_str() == Some("Job")).expect("the setup job");
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["args"][0].as_str(), Some("setup"));
}

#[test]
fn compose_file_is_accepted_by_docker_compose_where_installed() {
    let available =
        std::process::Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success());
    if !available {
        eprintln!("docker compose is not installed here: skipped `docker compose config`");
        return;
    }
    let out = std::process::Command::new("docker")
        .args(["compose", "-f", "docker-compose.yml", "config", "--quiet"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "docker compose config: {}", String::from_utf8_lossy(&out.stderr));
}
