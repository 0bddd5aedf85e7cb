//! The deployment files are code: these tests keep them valid and true to the processes.
//!
//! - Every YAML file under `deploy/` and `docker-compose.yml` parses.
//! - Kubernetes: workloads probe `/health` (liveness) and `/readyz` (readiness), request
//!   resources, take secrets only from Secrets; the NATS ConfigMap carries `cluster.conf`
//!   unchanged; every manifest is listed in the kustomization.
//! - Compose: application services run the one image with an entrypoint of ours, set only
//!   environment names the configuration reads, and check `/readyz`.
//! - Engines (compose and Kubernetes) own every ORDERS partition exactly once.
//! - Alert rules and the dashboard use only metrics of vault-core's catalog; every alert links
//!   to a README runbook entry and has a promtool test that fires it and one that does not.
//! - promtool accepts the configs, the rules and the rule tests (skipped with a notice when
//!   promtool is missing, a failure when `CI` is set).
//! - Every metric the alerts and the dashboard use is exported by the real processes (api,
//!   engine and the three workers started against a real nats-server and a fresh database),
//!   and the catalog's zero-registered series exist before any event.
//! - The cluster template forms a 3-node JetStream cluster that `Bus` reaches through a
//!   comma-separated URL list and that keeps R3 streams available with a node down.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use vault_bus::{Bus, consumers, streams};
use vault_core::Role;
use vault_core::config::{PARTITIONS, PartitionRange};
use vault_core::metric_names::{self, Kind, Zero};
use vault_testkit::{
    NatsServer, Proc, READY_DEADLINE, TestDb, base_env, free_port, http_client, nats_server_binary, poll_until,
    workspace_binary,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives inside the workspace").to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a YAML file (merge keys applied), as JSON values; empty documents skipped.
fn yaml_docs(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let mut value = serde_norway::Value::deserialize(doc).map_err(|e| e.to_string())?;
        value.apply_merge().map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        docs.push(serde_json::to_value(&value).map_err(|e| e.to_string())?);
    }
    Ok(docs)
}

fn yaml(path: &Path) -> Vec<Value> {
    yaml_docs(path).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn yaml_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(&root().join("deploy"), &mut files);
    files.retain(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"));
    files.push(root().join("docker-compose.yml"));
    files.sort();
    files
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what}: expected a string, got {value}"))
}

// ---------------------------------------------------------------------------------------------
// Names

/// The environment variable names `core/src/config.rs` reads (its upper-case string literals).
fn configuration_names() -> BTreeSet<String> {
    let source = read(&root().join("core/src/config.rs"));
    let names: BTreeSet<String> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.len() > 2 && s.starts_with(|c: char| c.is_ascii_uppercase()))
        .filter(|s| s.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .map(str::to_owned)
        .collect();
    for expected in ["DATABASE_URL", "NATS_URL", "JWT_SECRET", "OPS_ADDR", "ENGINE_PARTITIONS"] {
        assert!(names.contains(expected), "config.rs no longer names {expected}: {names:?}");
    }
    names
}

/// Variables that hold secrets: only ever from a Secret (Kubernetes) or the caller's
/// environment (compose), never a literal in a manifest.
const SECRET_NAMES: &[&str] = &["DATABASE_URL", "JWT_SECRET", "SMTP_URL", "SENTRY_DSN"];

/// The metric names a PromQL expression uses (ours start with `vault_` or `http_`; quoted
/// label values are skipped).
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i += 1;
            while i < bytes.len() && bytes[i] != c {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("vault_") || word.starts_with("http_") {
                names.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

fn prometheus_dir() -> PathBuf {
    root().join("deploy/prometheus")
}

fn dashboard_path() -> PathBuf {
    root().join("deploy/grafana/dashboards/cryptovault.json")
}

/// Every alerting rule of alerts.yml.
fn alert_rules() -> Vec<Value> {
    let docs = yaml(&prometheus_dir().join("alerts.yml"));
    let rules: Vec<Value> = docs[0]["groups"]
        .as_array()
        .expect("alerts.yml has groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(rules.len() >= 8, "alerts.yml lost rules: {}", rules.len());
    rules
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn dashboard_exprs() -> Vec<String> {
    let dashboard: Value =
        serde_json::from_str(&read(&dashboard_path())).unwrap_or_else(|e| panic!("the dashboard is not JSON: {e}"));
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "the dashboard lost its queries: {}", exprs.len());
    exprs
}

/// Metric names used by the alert rules and the dashboard, with where each is used.
fn used_metric_names() -> BTreeMap<String, String> {
    let mut used = BTreeMap::new();
    for rule in alert_rules() {
        let alert = str_of(&rule["alert"], "alert name").to_owned();
        for name in promql_metric_names(str_of(&rule["expr"], "alert expr")) {
            used.entry(name).or_insert_with(|| format!("alert {alert}"));
        }
    }
    for expr in dashboard_exprs() {
        for name in promql_metric_names(&expr) {
            used.entry(name).or_insert_with(|| "the dashboard".to_owned());
        }
    }
    used
}

/// GitHub's anchor of a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Files

#[test]
fn every_yaml_file_under_deploy_and_the_compose_file_parses() {
    let files = yaml_files();
    assert!(files.len() >= 12, "expected the deploy YAML files, found {files:?}");
    let broken: Vec<String> =
        files.iter().filter_map(|f| yaml_docs(f).err().map(|e| format!("{}: {e}", f.display()))).collect();
    assert!(broken.is_empty(), "YAML that does not parse:\n{}", broken.join("\n"));
}

fn k8s_docs() -> Vec<(String, Value)> {
    let dir = root().join("deploy/k8s");
    let mut files = Vec::new();
    files_under(&dir, &mut files);
    files.sort();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
        .flat_map(|f| {
            let name = f.file_name().expect("a file name").to_string_lossy().into_owned();
            yaml(f).into_iter().map(move |doc| (name.clone(), doc))
        })
        .collect()
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn env_entries(container: &Value) -> Vec<&Value> {
    container["env"].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

#[test]
fn kubernetes_workloads_probe_health_and_readyz_request_resources_and_take_secrets_from_secrets() {
    let docs = k8s_docs();
    let config_names = configuration_names();
    let kinds: Vec<&str> = docs.iter().map(|(_, d)| d["kind"].as_str().unwrap_or("")).collect();
    assert!(!kinds.contains(&"Secret"), "secrets are referenced, never stored in the manifests");

    let mut components = BTreeSet::new();
    for (file, doc) in docs.iter().filter(|(_, d)| d["kind"] == "Deployment" || d["kind"] == "StatefulSet") {
        let name = doc["metadata"]["name"].as_str().unwrap_or("?");
        let spec = pod_spec(doc);
        let containers = spec["containers"].as_array().unwrap_or_else(|| panic!("{file} {name}: no containers"));
        for container in containers {
            let what = format!("{file} {name}/{}", container["name"]);
            let ports: Vec<&str> =
                container["ports"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
            let ours = container["image"] == "cryptovault";
            let (live, ready) = (&container["livenessProbe"]["httpGet"], &container["readinessProbe"]["httpGet"]);
            if ours {
                assert_eq!(live["path"], "/health", "{what}: liveness must probe /health");
                assert_eq!(ready["path"], "/readyz", "{what}: readiness must probe /readyz");
                // /health is served once start-up reached Postgres and NATS (retried for about
                // a minute): liveness must not count that time, or an outage restarts pods.
                let startup = &container["startupProbe"];
                assert_eq!(startup["httpGet"]["path"], "/health", "{what}: a startup probe on /health");
                let patience =
                    startup["periodSeconds"].as_u64().unwrap_or(10) * startup["failureThreshold"].as_u64().unwrap_or(3);
                assert!(patience >= 120, "{what}: the startup probe gives up after {patience} s, before start-up does");
            } else {
                assert!(live["path"].is_string() && ready["path"].is_string(), "{what}: HTTP probes");
            }
            for probe in [live, ready] {
                assert!(
                    probe["port"].as_str().is_some_and(|p| ports.contains(&p)),
                    "{what}: a probe names a port the container does not declare: {probe}"
                );
            }
            let resources = &container["resources"];
            for (section, key) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
                assert!(!resources[section][key].is_null(), "{what}: resources.{section}.{key} missing");
            }
            if ours {
                let command = container["command"].as_array().expect("our containers name their binary");
                let binary = str_of(&command[0], "command");
                assert!(["vault-api", "vault-engine", "vault-worker"].contains(&binary), "{what}: {binary}");
                components.insert(
                    str_of(&doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"], "component")
                        .to_owned(),
                );
            }
        }
        let all = containers.iter().chain(spec["initContainers"].as_array().into_iter().flatten());
        for container in all.filter(|c| c["image"] == "cryptovault") {
            for env in env_entries(container) {
                let var = str_of(&env["name"], "env name");
                assert!(config_names.contains(var), "{file} {name}: {var} is not read by the configuration");
                if SECRET_NAMES.contains(&var) {
                    assert!(env["value"].is_null(), "{file} {name}: {var} must not be a literal");
                    assert!(env["valueFrom"]["secretKeyRef"]["name"].is_string(), "{file} {name}: {var} from a Secret");
                }
            }
            let from = container["envFrom"].as_array().cloned().unwrap_or_default();
            assert!(
                from.iter().any(|f| f["configMapRef"]["name"] == "vault-config"),
                "{file} {name}: envFrom vault-config"
            );
        }
    }
    // Job names of Prometheus come from the component label: they must be the process roles.
    let roles: BTreeSet<String> =
        ["api", "engine", "worker-prices", "worker-audit", "worker-notify"].map(String::from).into();
    assert_eq!(components, roles, "one workload per role, labelled with the role");

    let config = docs.iter().find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "vault-config");
    let config = config.expect("the ConfigMap vault-config").1["data"].as_object().expect("data").clone();
    assert_eq!(config["NATS_REPLICAS"], "3", "vault-config: streams replicated on the three NATS nodes");
    assert_eq!(config["NATS_URL"].as_str().map(|u| u.split(',').count()), Some(3), "vault-config: every NATS node");
    for key in config.keys() {
        assert!(config_names.contains(key), "vault-config: {key} is not read by the configuration");
        assert!(!SECRET_NAMES.contains(&key.as_str()), "vault-config: {key} is a secret");
    }

    // Every PodDisruptionBudget selects a workload.
    let pdbs: Vec<&Value> = docs.iter().filter(|(_, d)| d["kind"] == "PodDisruptionBudget").map(|(_, d)| d).collect();
    assert!(pdbs.len() >= 3, "PDBs for the API, the engines and NATS");
    for pdb in pdbs {
        let want = pdb["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
        let selects = docs.iter().any(|(_, d)| {
            let labels = &d["spec"]["template"]["metadata"]["labels"];
            want.iter().all(|(k, v)| &labels[k] == v)
        });
        assert!(selects, "PDB {} selects no workload", pdb["metadata"]["name"]);
    }
}

#[test]
fn the_kustomization_lists_every_manifest_and_the_nats_configmap_is_the_cluster_template() {
    let dir = root().join("deploy/k8s");
    let kustomization = &yaml(&dir.join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| str_of(r, "resource").to_owned())
        .collect();
    let mut files = Vec::new();
    files_under(&dir, &mut files);
    let present: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources vs the manifests present");

    let docs = k8s_docs();
    let configmap = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "nats-config")
        .expect("the ConfigMap nats-config");
    let template = read(&root().join("deploy/nats/cluster.conf"));
    assert_eq!(
        configmap.1["data"]["cluster.conf"].as_str(),
        Some(template.as_str()),
        "deploy/k8s/nats.yaml must carry deploy/nats/cluster.conf unchanged"
    );
    let nats = docs.iter().find(|(_, d)| d["kind"] == "StatefulSet").expect("the NATS StatefulSet");
    assert_eq!(nats.1["spec"]["replicas"], 3);
}

fn compose() -> Value {
    yaml(&root().join("docker-compose.yml")).remove(0)
}

/// The port of a `host:port` listen address.
fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or(addr)
}

#[test]
fn compose_services_run_the_one_image_with_names_the_configuration_reads_and_check_readyz() {
    let compose = compose();
    let config_names = configuration_names();
    let services = compose["services"].as_object().expect("services");
    let mut binaries = Vec::new();
    for (name, service) in services {
        for dependency in service["depends_on"].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_else(|| {
            service["depends_on"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| str_of(d, "depends_on").to_owned())
                .collect::<Vec<_>>()
        }) {
            assert!(services.contains_key(&dependency), "{name} depends on unknown {dependency}");
        }
        if !service["image"].as_str().is_some_and(|i| i.starts_with("cryptovault:")) {
            continue;
        }
        assert_eq!(service["image"], "cryptovault:local", "{name}: every application service runs the one image");
        let entrypoint = str_of(&service["entrypoint"][0], "entrypoint");
        assert!(["vault-api", "vault-engine", "vault-worker"].contains(&entrypoint), "{name}: {entrypoint}");
        let command: Vec<&str> =
            service["command"].as_array().into_iter().flatten().map(|c| str_of(c, "command")).collect();
        binaries.push(format!("{entrypoint} {}", command.join(" ")).trim().to_owned());
        let env = service["environment"].as_object().unwrap_or_else(|| panic!("{name}: environment as a map"));
        for key in env.keys() {
            assert!(config_names.contains(key), "{name}: {key} is not read by the configuration");
        }
        for required in ["DATABASE_URL", "NATS_URL"] {
            assert!(env.contains_key(required), "{name}: {required} missing");
        }
        assert_eq!(env["NATS_URL"].as_str().map(|u| u.split(',').count()), Some(3), "{name}: all three NATS nodes");
        assert_eq!(env["NATS_REPLICAS"], "3", "{name}: streams replicated on the three nodes");
        if command == ["migrate"] {
            continue;
        }
        let listen = if entrypoint == "vault-api" {
            assert!(env.contains_key("JWT_SECRET"), "{name}: the API needs JWT_SECRET");
            assert!(str_of(&env["JWT_SECRET"], "JWT_SECRET").starts_with("${"), "{name}: JWT_SECRET from the caller");
            str_of(&env["API_ADDR"], "API_ADDR")
        } else {
            str_of(&env["OPS_ADDR"], "OPS_ADDR")
        };
        assert!(listen.starts_with("0.0.0.0:"), "{name}: a container listens on 0.0.0.0, not {listen}");
        let check = service["healthcheck"]["test"].to_string();
        assert!(
            check.contains(&format!(":{}/readyz", port_of(listen))),
            "{name}: the health check must ask /readyz on the port it listens on: {check}"
        );
    }
    binaries.sort();
    assert_eq!(
        binaries,
        [
            "vault-api migrate",
            "vault-api serve",
            "vault-api serve",
            "vault-engine",
            "vault-engine",
            "vault-worker audit",
            "vault-worker notify",
            "vault-worker prices"
        ]
    );
    let nats: Vec<&String> = services.keys().filter(|k| k.starts_with("nats-")).collect();
    assert_eq!(nats.len(), 3, "a 3-node NATS cluster");
    for mount in ["./deploy/prometheus", "./deploy/grafana/provisioning", "./deploy/grafana/dashboards"] {
        assert!(compose.to_string().contains(mount), "{mount} is mounted");
        assert!(root().join(mount).is_dir(), "{mount} exists");
    }
}

fn assert_partitions_owned_once(what: &str, ranges: &[String]) {
    let mut owner = vec![0u32; PARTITIONS as usize];
    for range in ranges {
        let range: PartitionRange = range.parse().unwrap_or_else(|e| panic!("{what}: ENGINE_PARTITIONS {range}: {e}"));
        for p in range.iter() {
            owner[p as usize] += 1;
        }
    }
    assert!(owner.iter().all(|&n| n == 1), "{what}: every partition exactly once, got {owner:?} from {ranges:?}");
}

#[test]
fn the_engines_of_compose_and_kubernetes_own_every_partition_exactly_once() {
    let compose = compose();
    let ranges: Vec<String> = compose["services"]
        .as_object()
        .expect("services")
        .values()
        .filter(|s| s["entrypoint"][0] == "vault-engine")
        .map(|s| str_of(&s["environment"]["ENGINE_PARTITIONS"], "ENGINE_PARTITIONS").to_owned())
        .collect();
    assert!(ranges.len() >= 2, "compose runs more than one engine");
    assert_partitions_owned_once("docker-compose.yml", &ranges);

    let ranges: Vec<String> = k8s_docs()
        .iter()
        .filter(|(_, d)| d["kind"] == "Deployment")
        .flat_map(|(_, d)| pod_spec(d)["containers"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["command"][0] == "vault-engine")
        .map(|c| {
            let env = env_entries(&c).into_iter().find(|e| e["name"] == "ENGINE_PARTITIONS").cloned();
            str_of(&env.expect("every engine names its partitions")["value"], "ENGINE_PARTITIONS").to_owned()
        })
        .collect();
    assert!(ranges.len() >= 2, "Kubernetes runs more than one engine");
    assert_partitions_owned_once("deploy/k8s", &ranges);
}

// ---------------------------------------------------------------------------------------------
// Metrics, alerts, dashboard

#[test]
fn alerts_and_the_dashboard_use_only_metrics_of_the_catalog() {
    let used = used_metric_names();
    assert!(used.len() >= 15, "{used:?}");
    let unknown: Vec<String> = used
        .iter()
        .filter(|(name, _)| metric_names::lookup(name).is_none())
        .map(|(name, place)| format!("{name} (in {place})"))
        .collect();
    assert!(unknown.is_empty(), "not in vault_core::metric_names::CATALOG: {unknown:?}");
    // Histograms are queried through their series, never by their bare name.
    for name in used.keys() {
        let metric = metric_names::lookup(name).expect("checked above");
        if metric.kind == Kind::Histogram {
            assert_ne!(name, metric.name, "{name}: query a histogram through _bucket, _sum or _count");
        }
    }
}

/// `counter!("name"`, `gauge!("name"` and `histogram!("name"` in the workspace's sources.
fn recorded_literal_names() -> BTreeMap<String, String> {
    let mut files = Vec::new();
    for krate in ["core", "nats", "engine", "api", "workers", "loadgen"] {
        files_under(&root().join(krate).join("src"), &mut files);
    }
    let mut names = BTreeMap::new();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "rs")) {
        let source = read(file);
        for macro_name in ["counter!(", "gauge!(", "histogram!("] {
            for (at, _) in source.match_indices(macro_name) {
                let rest = source[at + macro_name.len()..].trim_start();
                if let Some(literal) = rest.strip_prefix('"').and_then(|r| r.split_once('"')).map(|(n, _)| n) {
                    names.insert(literal.to_owned(), file.strip_prefix(root()).unwrap_or(file).display().to_string());
                }
            }
        }
    }
    names
}

#[test]
fn every_metric_the_code_records_by_name_is_in_the_catalog() {
    let recorded = recorded_literal_names();
    assert!(recorded.len() >= 10, "the scan found too few metrics: {recorded:?}");
    let missing: Vec<String> = recorded
        .iter()
        .filter(|(name, _)| metric_names::lookup(name).is_none_or(|m| m.name != name.as_str()))
        .map(|(name, file)| format!("{name} ({file})"))
        .collect();
    assert!(missing.is_empty(), "add these to vault_core::metric_names::CATALOG: {missing:?}");
}

#[test]
fn every_alert_links_a_readme_runbook_entry_and_has_a_firing_and_a_quiet_test() {
    let readme = read(&root().join("README.md"));
    let anchors: BTreeSet<String> =
        readme.lines().filter_map(|l| l.strip_prefix('#')).map(|h| anchor(h.trim_start_matches('#'))).collect();
    let tests = &yaml(&prometheus_dir().join("alerts_test.yml"))[0];
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    let mut names = BTreeSet::new();
    for rule in alert_rules() {
        let alert = str_of(&rule["alert"], "alert").to_owned();
        assert!(names.insert(alert.clone()), "{alert} is defined twice");
        assert!(
            ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{alert}: severity"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(rule["annotations"][key].as_str().is_some_and(|s| !s.is_empty()), "{alert}: annotation {key}");
        }
        let url = str_of(&rule["annotations"]["runbook_url"], "runbook_url");
        let target = url.strip_prefix("README.md#").unwrap_or_else(|| panic!("{alert}: {url} is not README.md#…"));
        assert_eq!(target, anchor(&alert), "{alert}: the runbook anchor is the alert's name");
        assert!(anchors.contains(target), "{alert}: README.md has no heading for #{target}");

        let of_alert: Vec<&&Value> = cases.iter().filter(|c| c["alertname"] == alert.as_str()).collect();
        let fires = of_alert.iter().any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()));
        let quiet = of_alert.iter().any(|c| c["exp_alerts"].as_array().is_some_and(|a| a.is_empty()));
        assert!(fires && quiet, "{alert}: alerts_test.yml needs a case where it fires and one where it does not");
    }
}

/// promtool from PATH; `None` (with a notice) when it is missing outside CI.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("promtool")).find(|p| p.is_file()));
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool not found on PATH, and CI must run the Prometheus checks: install Debian's \
             `prometheus` package (./deploy/local.sh test does)"
        );
        eprintln!(
            "NOTICE: promtool not found on PATH; skipping the Prometheus checks (./deploy/local.sh test installs it)"
        );
    }
    found
}

fn run_promtool(promtool: &Path, dir: &Path, args: &[&str]) {
    let output = Command::new(promtool).args(args).current_dir(dir).output().expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_accepts_the_configs_the_rules_the_rule_tests_and_the_dashboard_queries() {
    let Some(promtool) = promtool() else { return };
    let dir = prometheus_dir();
    run_promtool(&promtool, &dir, &["check", "config", "prometheus.yml"]);
    run_promtool(&promtool, &dir, &["check", "config", "prometheus-compose.yml"]);
    run_promtool(&promtool, &dir, &["check", "rules", "alerts.yml"]);
    run_promtool(&promtool, &dir, &["test", "rules", "alerts_test.yml"]);

    // The dashboard's queries as recording rules: promtool parses every one of them. Grafana's
    // interval variables become a fixed range.
    let rules: Vec<Value> = dashboard_exprs()
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m");
            serde_json::json!({ "record": format!("dashboard_query_{i}"), "expr": expr })
        })
        .collect();
    let file = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    let tmp = tempfile::tempdir().expect("a temp dir");
    std::fs::write(tmp.path().join("dashboard.yml"), serde_norway::to_string(&file).expect("YAML"))
        .expect("write the rules");
    run_promtool(&promtool, tmp.path(), &["check", "rules", "dashboard.yml"]);
}

// ---------------------------------------------------------------------------------------------
// The real processes export what the alerts and the dashboard use

/// A scrape: every sample line by series name.
fn samples(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap_or_default().to_owned();
        out.entry(name).or_default().push(line.to_owned());
    }
    out
}

/// The value of the first sample whose line contains every one of `parts`.
fn value_of(text: &str, name: &str, parts: &[&str]) -> Option<f64> {
    samples(text).get(name)?.iter().find(|l| parts.iter().all(|p| l.contains(p)))?.rsplit(' ').next()?.parse().ok()
}

/// The series names a process must export for metric `name`.
fn series_of(name: &str, kind: Kind) -> Vec<String> {
    match kind {
        Kind::Histogram => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{name}{s}")).collect(),
        _ => vec![name.to_owned()],
    }
}

struct Running {
    role: Role,
    addr: String,
    proc: Proc,
}

async fn scrape(addr: &str) -> String {
    let resp = http_client().get(format!("http://{addr}/metrics")).send().await.expect("/metrics answers");
    resp.text().await.expect("a metrics body")
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported_by_the_running_processes() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let env = base_env(&db, &nats);
    let start = |role: Role, binary: &str, args: &[&str], extra: &[(&'static str, &str)]| {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut envs = env.clone();
        envs.push((if role == Role::Api { "API_ADDR" } else { "OPS_ADDR" }, addr.clone()));
        envs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Running { role, addr, proc: Proc::spawn(&workspace_binary(binary), args, &envs) }
    };
    let mut processes = vec![
        start(Role::Api, "vault-api", &["serve"], &[]),
        start(Role::Engine, "vault-engine", &[], &[]),
        start(Role::Prices, "vault-worker", &["prices"], &[("PRICE_SOURCE", "sim")]),
        start(Role::Audit, "vault-worker", &["audit"], &[]),
        start(Role::Notify, "vault-worker", &["notify"], &[]),
    ];
    for p in &mut processes {
        p.proc.wait_http_status(&p.addr, "/readyz", 200, READY_DEADLINE).await;
    }

    // Before any event: every series the catalog registers at 0, and each consumer's.
    let consumer_names = |role: Role| match role {
        Role::Engine => consumers::engine(PartitionRange::all()),
        Role::Audit => consumers::audit(),
        Role::Notify => consumers::notify(),
        _ => Vec::new(),
    };
    for p in &processes {
        let text = scrape(&p.addr).await;
        let present = samples(&text);
        for metric in metric_names::CATALOG.iter().filter(|m| m.roles.contains(&p.role)) {
            let labels: Vec<String> = match metric.zero {
                Zero::Plain => vec![String::new()],
                Zero::Each(label, values) => values.iter().map(|v| format!("{label}=\"{v}\"")).collect(),
                Zero::Dynamic => continue,
            };
            for series in series_of(metric.name, metric.kind) {
                for label in &labels {
                    let found =
                        present.get(&series).is_some_and(|lines| lines.iter().any(|l| l.contains(label.as_str())));
                    assert!(found, "{:?} does not export {series} {{{label}}} from the start:\n{text}", p.role);
                }
            }
        }
        for spec in consumer_names(p.role) {
            let consumer = format!("consumer=\"{}\"", spec.durable);
            for outcome in metric_names::PROCESSED_OUTCOMES {
                let outcome = format!("outcome=\"{outcome}\"");
                assert_eq!(
                    value_of(&text, metric_names::MESSAGES_PROCESSED, &[&consumer, &outcome]),
                    Some(0.0),
                    "{:?}: {consumer} {outcome} at 0 before any message:\n{text}",
                    p.role
                );
            }
            assert_eq!(value_of(&text, metric_names::PARKED_MESSAGES, &[&consumer]), Some(0.0), "{consumer} parked");
            assert!(
                value_of(&text, "vault_message_processing_seconds_count", &[&consumer]).is_some(),
                "{consumer} latency"
            );
        }
    }

    // Some traffic through every consumer: a signup and a login (AUTH), a deposit (ORDERS, then
    // EVENTS once the engine applied it).
    let api = processes[0].addr.clone();
    let client = http_client();
    let url = |path: &str| format!("http://{api}/api/v1{path}");
    let credentials = serde_json::json!({ "email": "metrics@example.com", "password": "a long password for metrics" });
    let signup = client.post(url("/auth/signup")).json(&credentials).send().await.expect("signup answers");
    assert_eq!(signup.status(), 201);
    let login: Value =
        client.post(url("/auth/login")).json(&credentials).send().await.expect("login").json().await.expect("json");
    let token = str_of(&login["access_token"], "access_token").to_owned();
    let deposit = client
        .post(url("/account/deposits"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "asset": "USD", "amount": "1000" }))
        .send()
        .await
        .expect("deposit answers");
    assert_eq!(deposit.status(), 202);

    // Every name the alerts and the dashboard use, from every process whose role exports it.
    let used = used_metric_names();
    let deadline = Duration::from_secs(30);
    let started = Instant::now();
    let texts = loop {
        let mut texts = Vec::new();
        for p in &processes {
            texts.push(scrape(&p.addr).await);
        }
        let mut missing = Vec::new();
        for (name, place) in &used {
            let metric = metric_names::lookup(name).unwrap_or_else(|| panic!("{name} ({place}) is not catalogued"));
            for (p, text) in processes.iter().zip(&texts) {
                if metric.roles.contains(&p.role) && !samples(text).contains_key(name.as_str()) {
                    missing.push(format!("{name} ({place}) from {:?}", p.role));
                }
            }
        }
        let processed = |i: usize, consumer: &str| {
            samples(&texts[i])
                .get(metric_names::MESSAGES_PROCESSED)
                .into_iter()
                .flatten()
                .filter(|l| l.contains(&format!("consumer=\"{consumer}\"")) && l.contains("outcome=\"ok\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        let engine_processed: f64 = samples(&texts[1])
            .get(metric_names::MESSAGES_PROCESSED)
            .into_iter()
            .flatten()
            .filter(|l| l.contains("outcome=\"ok\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let traffic_seen = engine_processed >= 1.0
            && processed(3, "audit-auth") >= 2.0
            && processed(3, "audit-orders") >= 1.0
            && processed(4, "notify-events") >= 1.0;
        if missing.is_empty() && traffic_seen {
            break texts;
        }
        for p in &mut processes {
            assert!(p.proc.is_running(), "{:?} exited:\n{}", p.role, p.proc.output());
        }
        assert!(
            started.elapsed() < deadline,
            "after {deadline:?}: missing {missing:?}; traffic counted: {traffic_seen} (engine ok {engine_processed}, \
             audit-auth {}, audit-orders {}, notify-events {})",
            processed(3, "audit-auth"),
            processed(3, "audit-orders"),
            processed(4, "notify-events"),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Every counted message also has a latency observation.
    let count = value_of(&texts[3], "vault_message_processing_seconds_count", &["consumer=\"audit-auth\""]);
    assert!(count.is_some_and(|c| c >= 2.0), "audit-auth latency count {count:?}");

    for p in &mut processes {
        p.proc.signal("TERM");
    }
    for p in &mut processes {
        let status = p.proc.wait_exit(Duration::from_secs(40)).await;
        assert!(status.success(), "{:?} did not stop cleanly:\n{}", p.role, p.proc.output());
    }
}

// ---------------------------------------------------------------------------------------------
// The 3-node cluster

/// One nats-server of the cluster, killed when dropped.
struct Node {
    child: Child,
    monitor: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_cluster_template_forms_a_jetstream_cluster_that_keeps_r3_streams_with_a_node_down() {
    let store = tempfile::tempdir().expect("a temp dir for the stores");
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port(), free_port())).collect();
    let routes: Vec<String> = ports.iter().map(|(_, cluster, _)| format!("nats-route://127.0.0.1:{cluster}")).collect();
    let mut nodes: Vec<Node> = ports
        .iter()
        .enumerate()
        .map(|(i, (client, cluster, monitor))| {
            let log = std::fs::File::create(store.path().join(format!("nats-{i}.log"))).expect("a log file");
            let child = Command::new(nats_server_binary())
                .args(["-c"])
                .arg(root().join("deploy/nats/cluster.conf"))
                .env("NATS_SERVER_NAME", format!("nats-{i}"))
                .env("NATS_LISTEN", format!("127.0.0.1:{client}"))
                .env("NATS_HTTP", format!("127.0.0.1:{monitor}"))
                .env("NATS_CLUSTER_LISTEN", format!("127.0.0.1:{cluster}"))
                .env("NATS_ROUTE_1", &routes[0])
                .env("NATS_ROUTE_2", &routes[1])
                .env("NATS_ROUTE_3", &routes[2])
                .env("NATS_STORE_DIR", store.path().join(format!("nats-{i}")))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server starts");
            Node { child, monitor: *monitor }
        })
        .collect();
    let client = http_client();
    for node in &nodes {
        let url = format!("http://127.0.0.1:{}/healthz", node.monitor);
        poll_until(READY_DEADLINE, "a cluster node to report JetStream healthy", || async {
            (client.get(&url).send().await.ok()?.status() == 200).then_some(())
        })
        .await;
        let jsz: Value = client
            .get(format!("http://127.0.0.1:{}/jsz", node.monitor))
            .send()
            .await
            .expect("/jsz")
            .json()
            .await
            .expect("json");
        assert_eq!(jsz["config"]["sync_always"], true, "sync_interval: always");
    }

    let urls: Vec<String> = ports.iter().map(|(client, _, _)| format!("nats://127.0.0.1:{client}")).collect();
    let bus = Bus::connect(&urls.join(","), "deploy-test").await.expect("connects through the list").with_replicas(3);
    bus.declare(&[]).await.expect(
        "R3 streams declared (retried, as every process does: a cluster just formed may time the first requests out)",
    );
    let replicated = |bus: Bus| async move {
        let mut stream = bus.jetstream().get_stream(streams::ORDERS.name).await.ok()?;
        let info = stream.info().await.ok()?;
        let cluster = info.cluster.clone()?;
        (cluster.leader.is_some() && cluster.replicas.len() == 2 && info.config.num_replicas == 3).then_some(())
    };
    poll_until(READY_DEADLINE, "ORDERS with a leader and two replicas", || replicated(bus.clone())).await;

    // One node down: the other two keep a quorum, the stream keeps a leader, the client
    // fails over.
    nodes.remove(0);
    poll_until(READY_DEADLINE, "ORDERS to answer with one node down", || {
        let bus = bus.clone();
        async move {
            let mut stream = bus.jetstream().get_stream(streams::ORDERS.name).await.ok()?;
            stream.info().await.ok()?.cluster.clone()?.leader.map(|_| ())
        }
    })
    .await;
}

/// The dev config `./deploy/local.sh up` starts NATS with (its ports overridden on the command
/// line as local.sh does; its relative store_dir lands in a scratch working directory) holds
/// every stream the processes declare:
/// a `max_file_store` below the streams' summed `max_bytes` makes JetStream refuse them.
#[tokio::test]
async fn the_dev_nats_config_holds_every_declared_stream() {
    let store = tempfile::tempdir().expect("store dir");
    let (port, monitor) = (free_port(), free_port());
    let mut server = Command::new(nats_server_binary())
        .arg("-c")
        .arg(root().join("deploy/nats/dev.conf"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string()])
        .current_dir(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let url = format!("nats://127.0.0.1:{port}");
    let bus = poll_until(READY_DEADLINE, "the dev nats-server with JetStream", || async {
        let bus = Bus::connect(&url, "deploy-test").await.ok()?;
        bus.jetstream().query_account().await.ok().map(|_| bus)
    })
    .await;
    let declared = bus.ensure_streams().await;
    let _ = server.kill();
    let _ = server.wait();
    let declared = declared.expect("every stream fits the dev config's JetStream limits");
    assert_eq!(declared.len(), streams::ALL.len());
}
