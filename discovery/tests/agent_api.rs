//! The embedded dev agent against `consul-api.md` §1, over real HTTP.
//!
//! Every test starts its own agent in-process on `127.0.0.1:0` and talks raw HTTP/1.1 to it
//! (hyper-util's legacy client), so status codes, plain-text bodies and headers are checked
//! byte for byte. Anything that depends on time (check runners, TTL expiry, reaping, blocking
//! queries) polls for a condition with a generous deadline; no assertion depends on a tight
//! timing window.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{dead_addr, dev_config, spawn_get, Agent, Reply, DEADLINE, PROMPTLY};
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

// ---------------------------------------------------------------------------------------------
// Harness (the agent itself is in `common`)
// ---------------------------------------------------------------------------------------------

impl Agent {
    /// A GET that must succeed with JSON.
    async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    async fn put(&self, path: &str, body: &str) -> Reply {
        self.call("PUT", path, body).await
    }

    async fn health(&self, query: &str) -> (Vec<Value>, u64) {
        let r = self.get(&format!("/v1/health/service/{query}")).await;
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        (r.json().as_array().unwrap().clone(), r.index())
    }

    async fn health_ids(&self, query: &str) -> Vec<String> {
        self.health(query)
            .await
            .0
            .iter()
            .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
            .collect()
    }

    async fn agent_checks(&self) -> Value {
        self.get_json("/v1/agent/checks").await
    }

    async fn agent_services(&self) -> Value {
        self.get_json("/v1/agent/services").await
    }

    /// Polls `/v1/agent/checks` until `pred` holds for check `id`; returns that check.
    async fn check_where(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let checks = self.agent_checks().await;
            let check = &checks[id];
            if !check.is_null() && pred(check) {
                return check.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for check {id} to be {what}; last seen {check}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn check_status(&self, id: &str, status: &str) -> Value {
        self.check_where(id, status, |c| c["Status"] == status)
            .await
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn ttl_service(id: &str, name: &str, status: Option<&str>) -> Value {
    let mut check = json!({"CheckID": format!("{id}:ttl"), "TTL": "60s"});
    if let Some(s) = status {
        check["Status"] = json!(s);
    }
    json!({"ID": id, "Name": name, "Address": "127.0.0.1", "Port": 8080, "Check": check})
}

// ---------------------------------------------------------------------------------------------
// Routing: 404, 405, OPTIONS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn wrong_method_is_405_with_allow_header() {
    let agent = Agent::start().await;
    let cases = [
        ("POST", "/v1/agent/service/register", "OPTIONS,PUT"),
        ("GET", "/v1/agent/service/register", "OPTIONS,PUT"),
        ("DELETE", "/v1/agent/service/deregister/web", "OPTIONS,PUT"),
        ("GET", "/v1/agent/service/maintenance/web", "OPTIONS,PUT"),
        // GET is no longer accepted for TTL updates.
        ("GET", "/v1/agent/check/pass/web", "OPTIONS,PUT"),
        ("GET", "/v1/agent/check/update/web", "OPTIONS,PUT"),
        ("POST", "/v1/agent/check/register", "OPTIONS,PUT"),
        ("PUT", "/v1/health/service/web", "OPTIONS,GET"),
        ("POST", "/v1/catalog/services", "OPTIONS,GET"),
        ("PUT", "/v1/agent/services", "OPTIONS,GET"),
        ("PUT", "/v1/agent/self", "OPTIONS,GET"),
        ("PUT", "/v1/agent/members", "OPTIONS,GET"),
        ("PUT", "/v1/status/leader", "OPTIONS,GET"),
        ("PUT", "/v1/agent/service/web", "OPTIONS,GET"),
    ];
    for (method, path, allow) in cases {
        let r = agent.call(method, path, "").await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(
            r.body,
            format!("method {method} not allowed"),
            "{method} {path}"
        );
        assert_eq!(r.header("Allow"), Some(allow), "{method} {path}");
    }
    // A refused write changed nothing.
    assert_eq!(agent.agent_services().await, json!({}));
}

#[tokio::test]
async fn options_is_200_with_allow_and_no_body() {
    let agent = Agent::start().await;
    for (path, allow) in [
        ("/v1/agent/service/register", "OPTIONS,PUT"),
        ("/v1/agent/check/pass/x", "OPTIONS,PUT"),
        ("/v1/health/service/web", "OPTIONS,GET"),
        ("/v1/catalog/services", "OPTIONS,GET"),
        ("/v1/agent/self", "OPTIONS,GET"),
    ] {
        let r = agent.call("OPTIONS", path, "").await;
        assert_eq!((r.status, r.body.as_str()), (200, ""), "OPTIONS {path}");
        assert_eq!(r.header("Allow"), Some(allow), "OPTIONS {path}");
    }
}

#[tokio::test]
async fn unknown_paths_are_404_with_consuls_text() {
    let agent = Agent::start().await;
    for path in [
        "/v1/nope",
        "/v1/agent/nope",
        "/v1/health/service",
        "/v1/kv/some/key",
        // Consul tests whether the path *contains* `/v1/`.
        "/ui/v1/x",
    ] {
        let r = agent.get(path).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (
                404,
                "Invalid URL path: not a recognized HTTP API endpoint\n"
            ),
            "GET {path}"
        );
    }
    for path in ["/nope", "/v2/agent/self"] {
        let r = agent.get(path).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (
                404,
                "Invalid URL path: if attempting to use the HTTP API, ensure the path starts with '/v1/'\n"
            ),
            "GET {path}"
        );
    }
}

#[tokio::test]
async fn the_root_says_the_ui_is_disabled_as_consul_does() {
    let agent = Agent::start().await;
    for method in ["GET", "HEAD", "PUT"] {
        let r = agent.call(method, "/", "").await;
        assert_eq!(r.status, 200, "{method} /");
        assert_eq!(r.header("Content-Type"), Some("text/plain; charset=utf-8"));
        if method != "HEAD" {
            assert_eq!(
                r.body,
                "Consul Agent: UI disabled. To enable, set ui_config.enabled=true in the agent configuration and restart.",
                "{method} /"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Registration: decoding (§1.2.1)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn register_decode_errors_are_400_with_gos_text() {
    let agent = Agent::start().await;
    let unknown = |k: &str| format!("Request decode failed: json: unknown field \"{k}\"");
    let cases: Vec<(&str, String)> = vec![
        ("", "Request decode failed: EOF".into()),
        ("  \n\t", "Request decode failed: EOF".into()),
        ("{", "Request decode failed: unexpected EOF".into()),
        (
            "xyz",
            "Request decode failed: invalid character 'x' looking for beginning of value".into(),
        ),
        // Unknown keys anywhere.
        (r#"{"Name":"web","Foo":1}"#, unknown("Foo")),
        (
            r#"{"Name":"web","Check":{"TTL":"5s","Foo":1}}"#,
            unknown("Foo"),
        ),
        (
            r#"{"Name":"web","Checks":[{"TTL":"5s"},{"TTL":"5s","Bar":true}]}"#,
            unknown("Bar"),
        ),
        (
            r#"{"Name":"web","Weights":{"Passing":1,"Heavy":2}}"#,
            unknown("Heavy"),
        ),
        (
            r#"{"Name":"web","TaggedAddresses":{"lan":{"Address":"10.0.0.1","Port":1,"Zone":"x"}}}"#,
            unknown("Zone"),
        ),
        // Enterprise-only keys are unknown on CE.
        (
            r#"{"Name":"web","Namespace":"default"}"#,
            unknown("Namespace"),
        ),
        (
            r#"{"Name":"web","Partition":"default"}"#,
            unknown("Partition"),
        ),
        // snake_case without an alias is unknown, at both levels.
        (
            r#"{"Name":"web","socket_path":"/x"}"#,
            unknown("socket_path"),
        ),
        (
            r#"{"Name":"web","service_name":"web"}"#,
            unknown("service_name"),
        ),
        (
            r#"{"Name":"web","Check":{"TTL":"5s","success_before_passing":2}}"#,
            unknown("success_before_passing"),
        ),
        (
            r#"{"Name":"web","Check":{"TTL":"5s","failures_before_critical":2}}"#,
            unknown("failures_before_critical"),
        ),
        (
            r#"{"Name":"web","Check":{"TTL":"5s","check_id":"c"}}"#,
            unknown("check_id"),
        ),
        (
            r#"{"Name":"web","Checks":[{"TTL":"5s","output_max_size":10}]}"#,
            unknown("output_max_size"),
        ),
        (
            r#"{"Name":"web","Check":{"alias_service":"db"}}"#,
            unknown("alias_service"),
        ),
        // Bad durations.
        (
            r#"{"Name":"web","Check":{"TTL":"abc"}}"#,
            "Request decode failed: time: invalid duration \"abc\"".into(),
        ),
        (
            r#"{"Name":"web","Check":{"TCP":"127.0.0.1:1","Interval":"10"}}"#,
            "Request decode failed: time: missing unit in duration \"10\"".into(),
        ),
        (
            r#"{"Name":"web","Check":{"TTL":"5s","DeregisterCriticalServiceAfter":"1x"}}"#,
            "Request decode failed: time: unknown unit \"x\" in duration \"1x\"".into(),
        ),
    ];
    for (body, text) in &cases {
        agent
            .expect_error("PUT", "/v1/agent/service/register", body, 400, text)
            .await;
    }
    // Type mismatches: Go's "cannot unmarshal" family.
    for (body, kind, go_type) in [
        (r#"{"Name":"web","Port":"80"}"#, "string", "int"),
        (r#"{"Name":1}"#, "number", "string"),
        (r#"{"Name":"web","Tags":"v1"}"#, "string", "[]string"),
        (
            r#"{"Name":"web","EnableTagOverride":"yes"}"#,
            "string",
            "bool",
        ),
    ] {
        let r = agent.put("/v1/agent/service/register", body).await;
        assert_eq!(r.status, 400, "{body}");
        let prefix = format!("Request decode failed: json: cannot unmarshal {kind} into Go ");
        assert!(r.body.starts_with(&prefix), "{body}: {}", r.body);
        assert!(
            r.body.ends_with(&format!(" of type {go_type}")),
            "{body}: {}",
            r.body
        );
    }
    // Nothing was stored by any refused registration.
    assert_eq!(agent.agent_services().await, json!({}));
    assert_eq!(agent.agent_checks().await, json!({}));
}

#[tokio::test]
async fn register_accepts_any_key_case_the_alias_list_nulls_and_nanoseconds() {
    let agent = Agent::start().await;
    // Lowercase and uppercase keys, the service- and check-level snake_case aliases, nulls for
    // known keys, lowercase keys inside TaggedAddresses, and a check-level ServiceID (ignored).
    agent
        .register(json!({
            "name": "web", "id": "web-1", "TAGS": ["v1"], "port": 8080, "ADDRESS": "127.0.0.1",
            "enable_tag_override": true,
            "tagged_addresses": {"lan": {"address": "10.0.0.1", "port": 81}},
            "meta": {"version": "1"},
            "Weights": null, "Checks": null, "Token": "",
            "check": {
                "ttl": "5s", "notes": "n", "status": "passing",
                "deregister_critical_service_after": "90s",
                "service_id": "someone-else", "tls_skip_verify": true, "tls_server_name": "x"
            }
        }))
        .await;
    let svc = &agent.agent_services().await["web-1"];
    assert_eq!(svc["Service"], "web");
    assert_eq!(svc["Tags"], json!(["v1"]));
    assert_eq!(svc["Port"], 8080);
    assert_eq!(svc["EnableTagOverride"], true);
    assert_eq!(svc["Meta"], json!({"version": "1"}));
    assert_eq!(svc["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(
        svc["TaggedAddresses"]["lan"],
        json!({"Address": "10.0.0.1", "Port": 81})
    );
    let check = &agent.agent_checks().await["service:web-1"];
    assert_eq!(check["Status"], "passing");
    assert_eq!(check["Notes"], "n");
    assert_eq!(
        check["ServiceID"], "web-1",
        "a check-level ServiceID is ignored"
    );
    assert_eq!(check["Type"], "ttl");
    assert_eq!(check["Definition"]["TTL"], "5s");
    assert_eq!(
        check["Definition"]["DeregisterCriticalServiceAfter"],
        "1m30s"
    );

    // The Go client's shape: "Check":null,"Checks":null, plus null lists and maps.
    agent
        .register(
            json!({"Name": "go", "Check": null, "Checks": null, "Tags": null,
                         "Meta": null, "TaggedAddresses": null, "Weights": null}),
        )
        .await;
    let svc = &agent.agent_services().await["go"];
    assert_eq!(svc["Tags"], json!([]), "Tags are [] not null");
    assert_eq!(svc["Meta"], json!({}), "Meta is {{}} not null");

    // Durations as nanosecond numbers; an all-zero Check object is ignored.
    agent
        .register(json!({"Name": "nanos", "Check": {"TTL": 5_000_000_000_u64}, "Checks": []}))
        .await;
    agent
        .register(json!({"Name": "empty-check", "Check": {}}))
        .await;
    let checks = agent.agent_checks().await;
    assert_eq!(checks["service:nanos"]["Definition"]["TTL"], "5s");
    assert!(
        !checks
            .as_object()
            .unwrap()
            .values()
            .any(|c| c["ServiceID"] == "empty-check"),
        "an empty Check object registers no check"
    );

    // A JSON null body decodes to the zero value: the name is missing, not a decode error.
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/register",
            "null",
            400,
            "Missing service name",
        )
        .await;
}

// ---------------------------------------------------------------------------------------------
// Registration: validation (§1.2.2, §1.2.3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn register_validation_messages_in_consuls_order() {
    let agent = Agent::start().await;
    let meta_err = |k: &str, v: &str, reason: &str| {
        format!("Invalid Service Meta: Couldn't load metadata pair ('{k}', '{v}'): {reason}")
    };
    let long_key = "k".repeat(129);
    let long_bad_key = format!("{}.", "k".repeat(129));
    let long_value = "v".repeat(513);
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let invalid_check = |m: &str| format!("Invalid check: {m}");
    let cases: Vec<(Value, String)> = vec![
        (json!({}), "Missing service name".into()),
        (json!({"Name": ""}), "Missing service name".into()),
        (json!({"Address": "0.0.0.0"}), "Missing service name".into()),
        (
            json!({"Name": "a", "Address": "0.0.0.0"}),
            "Invalid service address".into(),
        ),
        (
            json!({"Name": "a", "Address": "::"}),
            "Invalid service address".into(),
        ),
        (
            json!({"Name": "a", "Address": "0.0.0.0", "Weights": {"Passing": 0}}),
            "Invalid service address".into(),
        ),
        // Weights.
        (
            json!({"Name": "a", "Weights": {"Passing": 0, "Warning": 1}}),
            "Invalid Weights: Passing must be greater than 0".into(),
        ),
        (
            json!({"Name": "a", "Weights": {"Warning": 1}}),
            "Invalid Weights: Passing must be greater than 0".into(),
        ),
        (
            json!({"Name": "a", "Weights": {"Passing": 1, "Warning": -1}}),
            "Invalid Weights: Warning must be greater or equal than 0".into(),
        ),
        (
            json!({"Name": "a", "Weights": {"Passing": 65536, "Warning": 1}}),
            "Invalid Weights: DNS Weight must be between 0 and 65535".into(),
        ),
        (
            json!({"Name": "a", "Weights": {"Passing": 1, "Warning": 70000}}),
            "Invalid Weights: DNS Weight must be between 0 and 65535".into(),
        ),
        (
            json!({"Name": "a", "Weights": {"Passing": 0}, "Meta": {"": "x"}}),
            "Invalid Weights: Passing must be greater than 0".into(),
        ),
        // Meta.
        (
            json!({"Name": "a", "Meta": {"": "v"}}),
            meta_err("", "v", "Key cannot be blank"),
        ),
        (
            json!({"Name": "a", "Meta": {"a.b": "v"}}),
            meta_err("a.b", "v", "Key contains invalid characters"),
        ),
        (
            json!({"Name": "a", "Meta": {long_key.clone(): "v"}}),
            meta_err(&long_key, "v", "Key is too long (limit: 128 characters)"),
        ),
        // Consul tests the characters before the length.
        (
            json!({"Name": "a", "Meta": {long_bad_key.clone(): "v"}}),
            meta_err(&long_bad_key, "v", "Key contains invalid characters"),
        ),
        (
            json!({"Name": "a", "Meta": {"consul-x": "v"}}),
            meta_err(
                "consul-x",
                "v",
                "Key prefix 'consul-' is reserved for internal use",
            ),
        ),
        (
            json!({"Name": "a", "Meta": {"k": long_value.clone()}}),
            meta_err(
                "k",
                &long_value,
                "Value is too long (limit: 512 characters)",
            ),
        ),
        (
            json!({"Name": "a", "Meta": many}),
            "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs"
                .into(),
        ),
        (
            json!({"Name": "a", "Meta": {"": "x"}, "Check": {"Name": "x"}}),
            meta_err("", "x", "Key cannot be blank"),
        ),
        // Checks.
        (
            json!({"Name": "a", "Check": {"TTL": "5s", "Interval": "10s"}}),
            invalid_check("Interval and TTL cannot both be specified"),
        ),
        (
            json!({"Name": "a", "Check": {"HTTP": "http://127.0.0.1/"}}),
            invalid_check(
                "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
            ),
        ),
        (
            json!({"Name": "a", "Check": {"TCP": "127.0.0.1:1"}}),
            invalid_check(
                "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
            ),
        ),
        (
            json!({"Name": "a", "Check": {"Args": ["/bin/true"]}}),
            invalid_check(
                "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
            ),
        ),
        (
            json!({"Name": "a", "Check": {"Name": "only a name"}}),
            invalid_check("TTL must be > 0 for TTL checks"),
        ),
        (
            json!({"Name": "a", "Check": {"AliasService": "db", "Interval": "10s"}}),
            invalid_check("Interval cannot be set for Alias checks"),
        ),
        (
            json!({"Name": "a", "Check": {"AliasService": "db", "TTL": "10s"}}),
            invalid_check("TTL must be not be set for Alias checks"),
        ),
        (
            json!({"Name": "a", "Check": {"TTL": "5s", "OutputMaxSize": -1}}),
            invalid_check("MaxOutputMaxSize must be positive"),
        ),
        (
            json!({"Name": "a", "Check": {"TTL": "5s", "FailuresBeforeWarning": 3, "FailuresBeforeCritical": 1}}),
            invalid_check("FailuresBeforeWarning can't be higher than FailuresBeforeCritical"),
        ),
        (
            json!({"Name": "a", "Checks": [{"TTL": "5s"}, {"Name": "x"}]}),
            invalid_check("TTL must be > 0 for TTL checks"),
        ),
        // Status comes after every check validated.
        (
            json!({"Name": "a", "Check": {"TTL": "5s", "Status": "ok"}}),
            "Status for checks must 'passing', 'warning', 'critical'".into(),
        ),
        (
            json!({"Name": "a", "Checks": [{"TTL": "5s"}, {"TTL": "5s", "Status": "PASSING"}]}),
            "Status for checks must 'passing', 'warning', 'critical'".into(),
        ),
        (
            json!({"Name": "a", "Checks": [{"TTL": "5s", "Status": "ok"}, {"Name": "x"}]}),
            invalid_check("TTL must be > 0 for TTL checks"),
        ),
    ];
    for (body, text) in &cases {
        agent.expect_register_error(body, text).await;
    }
    // Script checks are refused last, with a 500 (a plain Go error in Consul).
    let scripts = "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true";
    for check in [
        json!({"Args": ["/bin/true"], "Interval": "10s"}),
        json!({"ScriptArgs": ["/bin/true"], "Interval": "10s"}),
        json!({"args": ["/bin/true"], "Interval": "10s"}),
        json!({"script_args": ["/bin/true"], "Interval": "10s"}),
    ] {
        let body = json!({"Name": "a", "Check": check}).to_string();
        agent
            .expect_error("PUT", "/v1/agent/service/register", &body, 500, scripts)
            .await;
    }
    assert_eq!(agent.agent_services().await, json!({}));
    assert_eq!(agent.agent_checks().await, json!({}));
}

// ---------------------------------------------------------------------------------------------
// Registration: defaults and re-registration (§1.2.2–§1.2.4)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn registration_defaults() {
    let agent = Agent::start().await;
    // No ID, one check without ID or name, no Weights, an IPv4 address.
    agent
        .register(json!({"Name": "web", "Address": "127.0.0.1", "Port": 8080,
                         "Check": {"TTL": "30s"}}))
        .await;
    let services = agent.agent_services().await;
    let web = &services["web"];
    assert_eq!(web["ID"], "web", "ID defaults to Name");
    assert_eq!(web["Tags"], json!([]));
    assert_eq!(web["Meta"], json!({}));
    assert_eq!(web["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(web["Datacenter"], "dc1");
    assert_eq!(
        web["TaggedAddresses"],
        json!({"lan_ipv4": {"Address": "127.0.0.1", "Port": 8080},
               "wan_ipv4": {"Address": "127.0.0.1", "Port": 8080}})
    );
    let check = &agent.agent_checks().await["service:web"];
    assert_eq!(check["CheckID"], "service:web");
    assert_eq!(check["Name"], "Service 'web' check");
    assert_eq!(check["Status"], "critical", "checks start critical");
    assert_eq!(check["ServiceName"], "web");
    assert_eq!(check["Node"], "dev");

    // Several checks: `service:<id>:<n>`, numbered across Check then Checks; explicit IDs and
    // names are kept.
    agent
        .register(
            json!({"ID": "api-1", "Name": "api", "Check": {"TTL": "30s"},
                         "Checks": [{"TTL": "30s", "Name": "custom"},
                                    {"TTL": "30s", "CheckID": "mine", "Status": "warning"}]}),
        )
        .await;
    let checks = agent.agent_checks().await;
    assert_eq!(checks["service:api-1:1"]["Name"], "Service 'api' check");
    assert_eq!(checks["service:api-1:2"]["Name"], "custom");
    assert_eq!(
        checks["mine"]["Status"], "warning",
        "an initial Status is honoured"
    );
    assert_eq!(checks["mine"]["ServiceID"], "api-1");
    assert!(checks["service:api-1"].is_null());
    assert!(checks["service:api-1:3"].is_null());

    // IPv6 literals get the _ipv6 pair; explicitly set keys are kept; non-IP addresses get none.
    agent
        .register(
            json!({"ID": "v6", "Name": "v6", "Address": "::1", "Port": 9,
                         "TaggedAddresses": {"lan_ipv6": {"Address": "fe80::1", "Port": 10}}}),
        )
        .await;
    agent
        .register(json!({"ID": "dns", "Name": "dns", "Address": "example.com", "Port": 9}))
        .await;
    let services = agent.agent_services().await;
    assert_eq!(
        services["v6"]["TaggedAddresses"],
        json!({"lan_ipv6": {"Address": "fe80::1", "Port": 10},
               "wan_ipv6": {"Address": "::1", "Port": 9}})
    );
    assert!(services["dns"].get("TaggedAddresses").is_none());

    // Port 0 is omitted from health/service (omitempty) but present elsewhere.
    agent.register(json!({"Name": "portless"})).await;
    let (entries, _) = agent.health("portless").await;
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0]["Service"].get("Port").is_none(),
        "{}",
        entries[0]
    );
    assert_eq!(entries[0]["Service"]["Tags"], json!([]));
    assert_eq!(entries[0]["Service"]["Address"], "");
    assert_eq!(agent.agent_services().await["portless"]["Port"], 0);
    let catalog = agent.get_json("/v1/catalog/service/portless").await;
    assert_eq!(catalog[0]["ServicePort"], 0);
    let (entries, _) = agent.health("web").await;
    assert_eq!(entries[0]["Service"]["Port"], 8080);
}

#[tokio::test]
async fn replace_existing_checks_semantics() {
    let agent = Agent::start().await;
    let both = json!({"Name": "web", "Checks": [{"CheckID": "a", "TTL": "30s"},
                                                 {"CheckID": "b", "TTL": "30s"}]});
    let only_a = json!({"Name": "web", "Checks": [{"CheckID": "a", "TTL": "30s"}]}).to_string();
    let ids = |checks: Value| -> BTreeSet<String> { keys(&checks) };

    agent.register(both.clone()).await;
    assert_eq!(ids(agent.agent_checks().await), set(&["a", "b"]));
    // Without the flag, and with any value other than empty or exactly `true`, old checks stay.
    for path in [
        "/v1/agent/service/register",
        "/v1/agent/service/register?replace-existing-checks=1",
        "/v1/agent/service/register?replace-existing-checks=false",
        "/v1/agent/service/register?replace-existing-checks=yes",
        "/v1/agent/service/register?replace-existing-checks=True",
    ] {
        agent.put_ok(path, &only_a).await;
        assert_eq!(ids(agent.agent_checks().await), set(&["a", "b"]), "{path}");
    }
    for path in [
        "/v1/agent/service/register?replace-existing-checks",
        "/v1/agent/service/register?replace-existing-checks=",
        "/v1/agent/service/register?replace-existing-checks=true",
    ] {
        agent.register(both.clone()).await;
        assert_eq!(ids(agent.agent_checks().await), set(&["a", "b"]));
        agent.put_ok(path, &only_a).await;
        assert_eq!(ids(agent.agent_checks().await), set(&["a"]), "{path}");
    }
    // Replacing with no checks at all removes them all.
    agent
        .put_ok(
            "/v1/agent/service/register?replace-existing-checks=true",
            &json!({"Name": "web"}).to_string(),
        )
        .await;
    assert_eq!(agent.agent_checks().await, json!({}));
}

#[tokio::test]
async fn status_is_preserved_across_reregistration() {
    let agent = Agent::start().await;
    let body = ttl_service("web-1", "web", None);
    agent.register(body.clone()).await;
    agent
        .put_ok("/v1/agent/check/pass/web-1:ttl?note=all%20good", "")
        .await;
    let before = agent.check_status("web-1:ttl", "passing").await;
    assert_eq!(before["Output"], "all good");

    // Identical, with a new tag, with a changed TTL: the live status and output survive.
    let mut tagged = body.clone();
    tagged["Tags"] = json!(["v2"]);
    let mut longer = tagged.clone();
    longer["Check"]["TTL"] = json!("120s");
    for b in [&body, &tagged, &longer] {
        agent
            .put_ok(
                "/v1/agent/service/register?replace-existing-checks=true",
                &b.to_string(),
            )
            .await;
        let check = &agent.agent_checks().await["web-1:ttl"];
        assert_eq!(check["Status"], "passing", "after {b}");
        assert_eq!(check["Output"], "all good", "after {b}");
        assert_eq!(check["CreateIndex"], before["CreateIndex"]);
    }
    assert_eq!(
        agent.agent_checks().await["web-1:ttl"]["ServiceTags"],
        json!(["v2"])
    );
    // A check that is new in a re-registration starts critical.
    let mut more = longer.clone();
    more["Checks"] = json!([{"CheckID": "extra", "TTL": "60s"}]);
    agent.register(more).await;
    let checks = agent.agent_checks().await;
    assert_eq!(checks["extra"]["Status"], "critical");
    assert_eq!(checks["web-1:ttl"]["Status"], "passing");
}

// ---------------------------------------------------------------------------------------------
// Other write endpoints (§1.3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn deregister_unknown_is_404_and_percent_encoded_ids_work() {
    let agent = Agent::start().await;
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/deregister/nope",
            "",
            404,
            "Unknown service ID \"nope\". Ensure that the service ID is passed, not the service name.",
        )
        .await;
    // The catalog-only `consul` service is not the agent's to deregister.
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/deregister/consul",
            "",
            404,
            "Unknown service ID \"consul\". Ensure that the service ID is passed, not the service name.",
        )
        .await;

    agent.register(json!({"ID": "web#1", "Name": "web"})).await;
    agent.register(json!({"ID": "web 2", "Name": "web"})).await;
    // By name, not ID: 404 with the text that says so.
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/deregister/web",
            "",
            404,
            "Unknown service ID \"web\". Ensure that the service ID is passed, not the service name.",
        )
        .await;
    let r = agent.get("/v1/agent/service/web%231").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["ID"], "web#1");
    agent
        .put_ok("/v1/agent/service/deregister/web%231", "")
        .await;
    agent
        .put_ok("/v1/agent/service/deregister/web%202", "")
        .await;
    assert_eq!(agent.agent_services().await, json!({}));
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/deregister/web%231",
            "",
            404,
            "Unknown service ID \"web#1\". Ensure that the service ID is passed, not the service name.",
        )
        .await;
}

#[tokio::test]
async fn deregister_removes_the_service_and_all_its_checks() {
    let agent = Agent::start().await;
    agent
        .register(json!({"ID": "web-1", "Name": "web",
                         "Checks": [{"TTL": "30s"}, {"TTL": "30s"}]}))
        .await;
    agent
        .put_ok(
            "/v1/agent/check/register",
            &json!({"Name": "attached", "TTL": "30s", "ServiceID": "web-1"}).to_string(),
        )
        .await;
    assert_eq!(keys(&agent.agent_checks().await).len(), 3);
    let (_, before) = agent.health("web").await;
    agent.put_ok("/v1/agent/service/deregister/web-1", "").await;
    assert_eq!(agent.agent_checks().await, json!({}));
    let (entries, after) = agent.health("web").await;
    assert!(entries.is_empty());
    assert!(after > before, "a deregistration moves the index");
}

#[tokio::test]
async fn ttl_endpoints_errors_and_effects() {
    let agent = Agent::start().await;
    let unknown = |id: &str| {
        format!(
            "Unknown check ID \"{id}\". Ensure that the check ID is passed, not the check name."
        )
    };
    for verb in ["pass", "warn", "fail"] {
        agent
            .expect_error(
                "PUT",
                &format!("/v1/agent/check/{verb}/nope"),
                "",
                404,
                &unknown("nope"),
            )
            .await;
    }
    agent
        .expect_error(
            "PUT",
            "/v1/agent/check/update/nope",
            r#"{"Status":"passing"}"#,
            404,
            &unknown("nope"),
        )
        .await;
    // The node's serfHealth is not an agent-local check.
    agent
        .expect_error(
            "PUT",
            "/v1/agent/check/pass/serfHealth",
            "",
            404,
            &unknown("serfHealth"),
        )
        .await;

    // A known check that is not a TTL check: 500.
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    agent
        .register(json!({"Name": "db", "Checks": [
            {"CheckID": "db-tcp", "TCP": tcp.local_addr().unwrap().to_string(), "Interval": "30s"},
            {"CheckID": "db-ttl", "TTL": "60s", "OutputMaxSize": 10}]}))
        .await;
    for path in [
        "/v1/agent/check/pass/db-tcp",
        "/v1/agent/check/warn/db-tcp",
        "/v1/agent/check/fail/db-tcp",
    ] {
        agent
            .expect_error(
                "PUT",
                path,
                "",
                500,
                "CheckID \"db-tcp\" does not have associated TTL",
            )
            .await;
    }
    agent
        .expect_error(
            "PUT",
            "/v1/agent/check/update/db-tcp",
            r#"{"Status":"passing"}"#,
            500,
            "CheckID \"db-tcp\" does not have associated TTL",
        )
        .await;

    // update: body errors and bad statuses (checked before the check is looked up).
    for (body, text) in [
        ("", "Request decode failed: EOF".to_string()),
        (
            r#"{"Status":"passing","Foo":1}"#,
            "Request decode failed: json: unknown field \"Foo\"".to_string(),
        ),
        (
            r#"{"Status":"ok"}"#,
            "Invalid check status: 'ok'".to_string(),
        ),
        (r#"{}"#, "Invalid check status: ''".to_string()),
        (
            r#"{"Status":"Passing"}"#,
            "Invalid check status: 'Passing'".to_string(),
        ),
    ] {
        agent
            .expect_error("PUT", "/v1/agent/check/update/db-ttl", body, 400, &text)
            .await;
        agent
            .expect_error("PUT", "/v1/agent/check/update/nope", body, 400, &text)
            .await;
    }

    // pass/warn/fail set the status and the note becomes the output.
    for (verb, status) in [
        ("pass", "passing"),
        ("warn", "warning"),
        ("fail", "critical"),
    ] {
        agent
            .put_ok(&format!("/v1/agent/check/{verb}/db-ttl?note={verb}ed"), "")
            .await;
        let c = &agent.agent_checks().await["db-ttl"];
        assert_eq!(c["Status"], status);
        assert_eq!(c["Output"], format!("{verb}ed"));
    }
    // update with lowercase keys; output beyond OutputMaxSize is cut and annotated.
    agent
        .put_ok(
            "/v1/agent/check/update/db-ttl",
            r#"{"status":"warning","output":"0123456789abcdefghijklmno"}"#,
        )
        .await;
    let c = &agent.agent_checks().await["db-ttl"];
    assert_eq!(c["Status"], "warning");
    assert_eq!(c["Output"], "0123456789 ... (captured 10 of 25 bytes)");
}

#[tokio::test]
async fn maintenance_errors_and_effects() {
    let agent = Agent::start().await;
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/maintenance/?enable=true",
            "",
            400,
            "Missing service ID",
        )
        .await;
    agent
        .register(ttl_service("web-1", "web", Some("passing")))
        .await;
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/maintenance/web-1",
            "",
            400,
            "Missing value for enable",
        )
        .await;
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/maintenance/web-1?enable=maybe",
            "",
            400,
            "Invalid value for enable: \"maybe\"",
        )
        .await;
    agent
        .expect_error(
            "PUT",
            "/v1/agent/service/maintenance/nope?enable=true",
            "",
            404,
            "Unknown service ID \"nope\". Ensure that the service ID is passed, not the service name.",
        )
        .await;

    assert_eq!(agent.health_ids("web?passing").await, ["web-1"]);
    let (_, i0) = agent.health("web").await;
    agent
        .put_ok(
            "/v1/agent/service/maintenance/web-1?enable=true&reason=draining%20now",
            "",
        )
        .await;
    let maint = &agent.agent_checks().await["_service_maintenance:web-1"];
    assert_eq!(maint["Status"], "critical");
    assert_eq!(maint["Name"], "Service Maintenance Mode");
    assert_eq!(maint["Notes"], "draining now");
    assert_eq!(maint["ServiceID"], "web-1");
    let (entries, i1) = agent.health("web").await;
    assert!(i1 > i0);
    assert_eq!(
        entries.len(),
        1,
        "without ?passing the instance is still listed"
    );
    assert!(agent.health_ids("web?passing").await.is_empty());
    let r = agent.get("/v1/agent/health/service/id/web-1").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["AggregatedStatus"], "maintenance");

    // Enabling twice (any ParseBool spelling) changes nothing.
    agent
        .put_ok("/v1/agent/service/maintenance/web-1?enable=1", "")
        .await;
    assert_eq!(agent.health("web").await.1, i1);
    assert_eq!(
        agent.agent_checks().await["_service_maintenance:web-1"]["Notes"],
        "draining now"
    );

    agent
        .put_ok("/v1/agent/service/maintenance/web-1?enable=false", "")
        .await;
    assert!(agent.agent_checks().await["_service_maintenance:web-1"].is_null());
    assert_eq!(agent.health_ids("web?passing").await, ["web-1"]);
    // Disabling again is a no-op, still 200.
    agent
        .put_ok("/v1/agent/service/maintenance/web-1?enable=F", "")
        .await;

    // Without a reason, Consul's default text.
    agent
        .put_ok("/v1/agent/service/maintenance/web-1?enable=TRUE", "")
        .await;
    let notes = agent.agent_checks().await["_service_maintenance:web-1"]["Notes"].clone();
    assert!(
        notes.as_str().unwrap().contains("no reason was provided"),
        "{notes}"
    );
}

#[tokio::test]
async fn check_register_errors_and_node_checks() {
    let agent = Agent::start().await;
    let path = "/v1/agent/check/register";
    for (body, status, text) in [
        ("", 400, "Request decode failed: EOF"),
        (r#"{"Name":"c","TTL":"5s","Foo":1}"#, 400, "Request decode failed: json: unknown field \"Foo\""),
        (r#"{"TTL":"5s"}"#, 400, "Missing check name"),
        (r#"{"Name":"","TTL":"5s"}"#, 400, "Missing check name"),
        (r#"{"Name":"c","TTL":"5s","Status":"ok"}"#, 400, "Bad check status"),
        (r#"{"Name":"c"}"#, 400, "Invalid check: TTL must be > 0 for TTL checks"),
        (
            r#"{"Name":"c","HTTP":"http://127.0.0.1/"}"#,
            400,
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        ),
        (r#"{"Name":"c","TTL":"5s","ServiceID":"nope"}"#, 404, "ServiceID \"nope\" does not exist"),
        (
            r#"{"Name":"c","Args":["/bin/true"],"Interval":"10s"}"#,
            500,
            "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true",
        ),
    ] {
        agent.expect_error("PUT", path, body, status, text).await;
    }
    assert_eq!(agent.agent_checks().await, json!({}));

    agent
        .register(ttl_service("web-1", "web", Some("passing")))
        .await;
    // Attached to a service (service_id alias), ID given.
    agent
        .put_ok(
            path,
            r#"{"ID":"extra","Name":"extra","TTL":"30s","service_id":"web-1","Status":"passing"}"#,
        )
        .await;
    let extra = &agent.agent_checks().await["extra"];
    assert_eq!(extra["ServiceID"], "web-1");
    assert_eq!(extra["ServiceName"], "web");
    assert_eq!(extra["Status"], "passing");
    assert_eq!(agent.health_ids("web?passing").await, ["web-1"]);

    // A node-level check (no ServiceID; ID defaults to Name) shows up in every entry of the
    // node, and a critical one hides every instance from ?passing.
    agent.put_ok(path, r#"{"Name":"mem","TTL":"30s"}"#).await;
    let mem = &agent.agent_checks().await["mem"];
    assert_eq!(mem["ServiceID"], "");
    assert_eq!(mem["Status"], "critical");
    let (entries, _) = agent.health("web").await;
    let ids: Vec<&str> = entries[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"mem") && ids.contains(&"serfHealth"),
        "{ids:?}"
    );
    assert!(agent.health_ids("web?passing").await.is_empty());
    agent.put_ok("/v1/agent/check/pass/mem", "").await;
    assert_eq!(agent.health_ids("web?passing").await, ["web-1"]);

    // check/deregister.
    agent
        .expect_error(
            "PUT",
            "/v1/agent/check/deregister/nope",
            "",
            404,
            "Unknown check ID \"nope\". Ensure that the check ID is passed, not the check name.",
        )
        .await;
    agent.put_ok("/v1/agent/check/deregister/extra", "").await;
    agent.put_ok("/v1/agent/check/deregister/mem", "").await;
    assert_eq!(keys(&agent.agent_checks().await), set(&["web-1:ttl"]));
}

// ---------------------------------------------------------------------------------------------
// Check runners (§1.7)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ttl_check_flips_passing_critical_passing_and_expires() {
    let agent = Agent::start().await;
    let client = agent.client();
    agent.register(ttl_service("web-1", "web", None)).await;
    assert!(agent.health_ids("web?passing").await.is_empty());
    let (_, mut last) = agent.health("web").await;
    for (status, note) in [
        ("passing", "up"),
        ("critical", "down"),
        ("passing", "up again"),
    ] {
        match status {
            "passing" => client.check_pass("web-1:ttl", Some(note)).await.unwrap(),
            _ => client.check_fail("web-1:ttl", Some(note)).await.unwrap(),
        }
        let (entries, index) = agent.health("web").await;
        assert!(index > last, "a status change moves the index");
        last = index;
        let check = entries[0]["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["CheckID"] == "web-1:ttl")
            .unwrap()
            .clone();
        assert_eq!(
            (check["Status"].as_str(), check["Output"].as_str()),
            (Some(status), Some(note))
        );
        let passing = agent.health_ids("web?passing").await;
        assert_eq!(passing.is_empty(), status != "passing");
    }

    // A short TTL runs out: critical, with the last output quoted.
    agent
        .register(json!({"Name": "short", "Check": {"CheckID": "short", "TTL": "1s"}}))
        .await;
    client
        .check_pass("short", Some("last words"))
        .await
        .unwrap();
    let expired = agent.check_status("short", "critical").await;
    assert_eq!(
        expired["Output"],
        "TTL expired (last output before timeout follows): last words"
    );
}

/// A tiny HTTP server whose status code is read from `status` on every request; it records
/// the `User-Agent` and `Accept` headers it saw.
async fn toggled_server(
    status: Arc<AtomicU16>,
    seen: Arc<Mutex<Option<(String, String)>>>,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let status = status.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let code = status.load(Ordering::SeqCst);
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    *seen.lock().unwrap() = Some((header("user-agent"), header("accept")));
                    let body = if code == 200 { "ok" } else { "not ok" };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn http_check_follows_its_target() {
    let agent = Agent::start().await;
    let status = Arc::new(AtomicU16::new(200));
    let seen = Arc::new(Mutex::new(None));
    let (addr, server) = toggled_server(status.clone(), seen.clone()).await;
    let url = format!("http://{addr}/health");
    agent
        .register(
            json!({"ID": "web-1", "Name": "web", "Address": "127.0.0.1", "Port": addr.port(),
                         "Check": {"CheckID": "web-http", "HTTP": url, "Interval": "1s",
                                   "Timeout": "5s"}}),
        )
        .await;

    let c = agent.check_status("web-http", "passing").await;
    assert_eq!(c["Output"], format!("HTTP GET {url}: 200 OK Output: ok"));
    assert_eq!(c["Type"], "http");
    assert_eq!(c["Interval"], "1s");
    assert_eq!(c["Definition"]["HTTP"], url);
    let (ua, accept) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(ua, "Consul Health Check");
    assert_eq!(accept, "text/plain, text/*, */*");
    assert_eq!(agent.health_ids("web?passing").await, ["web-1"]);

    status.store(503, Ordering::SeqCst);
    let c = agent.check_status("web-http", "critical").await;
    assert_eq!(
        c["Output"],
        format!("HTTP GET {url}: 503 Service Unavailable Output: not ok")
    );
    assert!(agent.health_ids("web?passing").await.is_empty());

    status.store(429, Ordering::SeqCst);
    let c = agent.check_status("web-http", "warning").await;
    assert_eq!(
        c["Output"],
        format!("HTTP GET {url}: 429 Too Many Requests Output: not ok")
    );
    assert!(
        agent.health_ids("web?passing").await.is_empty(),
        "?passing drops warning too"
    );

    status.store(200, Ordering::SeqCst);
    agent.check_status("web-http", "passing").await;
    assert_eq!(agent.health_ids("web?passing").await, ["web-1"]);

    // The target goes away: critical with Go's transport error.
    server.abort();
    let _ = server.await;
    let c = agent.check_status("web-http", "critical").await;
    let out = c["Output"].as_str().unwrap();
    assert!(out.starts_with(&format!("Get \"{url}\": ")), "{out}");
}

#[tokio::test]
async fn tcp_check_passes_on_a_listener_and_fails_on_a_closed_port() {
    let agent = Agent::start().await;
    let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_addr = open.local_addr().unwrap();
    let closed = dead_addr().await;
    agent
        .register(json!({"Name": "db", "Checks": [
            {"CheckID": "open", "TCP": open_addr.to_string(), "Interval": "1s"},
            {"CheckID": "closed", "TCP": closed.to_string(), "Interval": "1s", "Status": "passing"}]}))
        .await;
    let c = agent.check_status("open", "passing").await;
    assert_eq!(c["Output"], format!("TCP connect {open_addr}: Success"));
    assert_eq!(c["Type"], "tcp");
    let c = agent.check_status("closed", "critical").await;
    assert_eq!(
        c["Output"],
        format!("dial tcp {closed}: connect: connection refused")
    );
    drop(open);
}

#[tokio::test]
async fn critical_services_are_reaped_after_deregister_critical_service_after() {
    let mut config = dev_config();
    config.reap_interval = Duration::from_millis(100);
    config.deregister_min = Duration::from_millis(200);
    let agent = Agent::start_with(config).await;
    agent
        .register(json!({"ID": "doomed", "Name": "web",
                         "Check": {"TTL": "60s", "DeregisterCriticalServiceAfter": "500ms"}}))
        .await;
    agent
        .register(json!({"ID": "healthy", "Name": "web",
                         "Check": {"TTL": "60s", "Status": "passing",
                                   "DeregisterCriticalServiceAfter": "500ms"}}))
        .await;
    let (_, before) = agent.health("web").await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = agent.get("/v1/agent/service/doomed").await;
        if r.status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "doomed was never reaped");
        sleep(Duration::from_millis(50)).await;
    }
    let services = agent.agent_services().await;
    assert_eq!(keys(&services), set(&["healthy"]));
    assert!(agent.agent_checks().await["service:doomed"].is_null());
    let (entries, after) = agent.health("web").await;
    assert_eq!(entries.len(), 1);
    assert!(after > before, "reaping moves the index");
}

#[tokio::test]
async fn deregister_critical_service_after_is_raised_to_the_floor() {
    let mut config = dev_config();
    config.reap_interval = Duration::from_millis(50);
    // Consul's 1 min floor stays: a 1 ms request must not reap within the test.
    let agent = Agent::start_with(config).await;
    agent
        .register(json!({"ID": "kept", "Name": "web",
                         "Check": {"TTL": "60s", "DeregisterCriticalServiceAfter": "1ms"}}))
        .await;
    // A bounded wait for something that must *not* happen: ~20 reaper rounds.
    sleep(Duration::from_secs(1)).await;
    assert_eq!(keys(&agent.agent_services().await), set(&["kept"]));
}

// ---------------------------------------------------------------------------------------------
// Read endpoints and shapes (§1.4)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reads_carry_consuls_query_meta_headers() {
    let agent = Agent::start().await;
    agent.register(ttl_service("web-1", "web", None)).await;
    for path in [
        "/v1/health/service/web",
        "/v1/health/service/missing",
        "/v1/health/checks/web",
        "/v1/health/node/dev",
        "/v1/health/state/any",
        "/v1/catalog/services",
        "/v1/catalog/service/web",
        "/v1/catalog/nodes",
        "/v1/catalog/node/dev",
    ] {
        for (q, consistency) in [
            ("", "leader"),
            ("?stale", "stale"),
            ("?stale=", "stale"),
            ("?consistent", "consistent"),
        ] {
            let r = agent.get(&format!("{path}{q}")).await;
            assert_eq!(r.status, 200, "{path}{q}: {}", r.body);
            r.index();
            assert_eq!(r.header("X-Consul-KnownLeader"), Some("true"), "{path}{q}");
            assert_eq!(r.header("X-Consul-LastContact"), Some("0"), "{path}{q}");
            assert_eq!(
                r.header("X-Consul-Effective-Consistency"),
                Some(consistency),
                "{path}{q}"
            );
            assert_eq!(
                r.header("Content-Type"),
                Some("application/json"),
                "{path}{q}"
            );
        }
    }
}

#[tokio::test]
async fn query_parameter_errors() {
    let agent = Agent::start().await;
    for (path, text) in [
        (
            "/v1/health/service/web?passing=maybe",
            "Invalid value for ?passing",
        ),
        (
            "/v1/health/service/web?passing=yes",
            "Invalid value for ?passing",
        ),
        ("/v1/health/service/web?index=abc", "Invalid index"),
        ("/v1/health/service/web?index=-1", "Invalid index"),
        (
            "/v1/health/service/web?index=1&wait=soon",
            "Invalid wait time",
        ),
        ("/v1/catalog/services?wait=10", "Invalid wait time"),
        // Consul parses wait before index.
        ("/v1/catalog/services?index=x&wait=y", "Invalid wait time"),
        (
            "/v1/health/service/web?stale&consistent",
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ),
        (
            "/v1/catalog/services?stale=&consistent=",
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ),
        (
            "/v1/catalog/services?cached&consistent",
            "Cannot specify ?cached with ?consistent, conflicting semantics.",
        ),
        (
            "/v1/catalog/services?stale&max_stale=x",
            "Invalid max_stale value \"x\"",
        ),
        ("/v1/health/service/", "Missing service name"),
        ("/v1/health/checks/", "Missing service name"),
        ("/v1/catalog/service/", "Missing service name"),
        ("/v1/health/state/", "Missing check state"),
        (
            "/v1/agent/members?wan&segment=x",
            "Cannot provide a segment with wan=true",
        ),
    ] {
        agent.expect_error("GET", path, "", 400, text).await;
    }
    // Go's ParseDuration takes a negative wait, and Consul then uses its default.
    let r = agent.get("/v1/catalog/services?wait=-5s").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn passing_filter_drops_warning_and_critical() {
    let agent = Agent::start().await;
    agent
        .register(ttl_service("p", "svc", Some("passing")))
        .await;
    agent
        .register(ttl_service("w", "svc", Some("warning")))
        .await;
    agent
        .register(ttl_service("c", "svc", Some("critical")))
        .await;
    for q in [
        "",
        "?passing=false",
        "?passing=0",
        "?passing=f",
        "?passing=FALSE",
    ] {
        assert_eq!(
            agent.health_ids(&format!("svc{q}")).await,
            ["c", "p", "w"],
            "{q}"
        );
    }
    for q in [
        "?passing",
        "?passing=",
        "?passing=1",
        "?passing=true",
        "?passing=T",
        "?passing=True",
    ] {
        assert_eq!(agent.health_ids(&format!("svc{q}")).await, ["p"], "{q}");
    }
}

#[tokio::test]
async fn tag_filter_is_and_and_case_insensitive() {
    let agent = Agent::start().await;
    agent
        .register(json!({"ID": "a", "Name": "web", "Tags": ["v1", "Primary"]}))
        .await;
    agent
        .register(json!({"ID": "b", "Name": "web", "Tags": ["v1"]}))
        .await;
    agent
        .register(json!({"ID": "c", "Name": "web", "Tags": ["v2"]}))
        .await;
    for (q, want) in [
        ("?tag=v1", vec!["a", "b"]),
        ("?tag=V1", vec!["a", "b"]),
        ("?tag=v1&tag=primary", vec!["a"]),
        ("?tag=PRIMARY&tag=V1", vec!["a"]),
        ("?tag=v1&tag=v2", vec![]),
        ("?tag=v3", vec![]),
    ] {
        assert_eq!(agent.health_ids(&format!("web{q}")).await, want, "{q}");
        let catalog = agent.get_json(&format!("/v1/catalog/service/web{q}")).await;
        let ids: Vec<&str> = catalog
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["ServiceID"].as_str().unwrap())
            .collect();
        assert_eq!(ids, want, "catalog {q}");
    }
}

#[tokio::test]
async fn results_are_sorted_by_service_id() {
    let agent = Agent::start().await;
    for id in ["web-c", "web-a", "web-b"] {
        agent.register(json!({"ID": id, "Name": "web"})).await;
    }
    assert_eq!(agent.health_ids("web").await, ["web-a", "web-b", "web-c"]);
    let catalog = agent.get_json("/v1/catalog/service/web").await;
    let ids: Vec<&str> = catalog
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ServiceID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web-a", "web-b", "web-c"]);
}

#[tokio::test]
async fn health_service_entry_shape() {
    let agent = Agent::start().await;
    let (entries, _) = agent.health("web").await;
    assert!(entries.is_empty(), "an unknown service is 200 []");

    agent
        .register(
            json!({"ID": "web-1", "Name": "web", "Address": "127.0.0.1", "Port": 8080,
                         "Tags": ["v1"], "Meta": {"version": "1"},
                         "Check": {"CheckID": "web-1:ttl", "TTL": "60s", "Status": "passing"}}),
        )
        .await;
    let (entries, _) = agent.health("web").await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(keys(e), set(&["Node", "Service", "Checks"]));
    let node = &e["Node"];
    assert_eq!(node["Node"], "dev");
    assert_eq!(node["Address"], "127.0.0.1");
    assert_eq!(node["Datacenter"], "dc1");
    assert_eq!(node["ID"].as_str().unwrap().len(), 36, "a UUID");
    assert_eq!(
        node["TaggedAddresses"],
        json!({"lan": "127.0.0.1", "lan_ipv4": "127.0.0.1",
               "wan": "127.0.0.1", "wan_ipv4": "127.0.0.1"})
    );
    assert!(node["Meta"].get("consul-network-segment").is_some());
    let svc = &e["Service"];
    assert_eq!(svc["ID"], "web-1");
    assert_eq!(svc["Service"], "web");
    assert_eq!(svc["Tags"], json!(["v1"]));
    assert_eq!(svc["Port"], 8080);
    assert_eq!(svc["Meta"], json!({"version": "1"}));
    assert_eq!(svc["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(svc["EnableTagOverride"], false);
    assert!(svc["CreateIndex"].as_u64().unwrap() >= 1);
    assert!(svc["ModifyIndex"].as_u64().unwrap() >= svc["CreateIndex"].as_u64().unwrap());
    let checks = e["Checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2);
    // The node check first, then the service's.
    assert_eq!(checks[0]["CheckID"], "serfHealth");
    assert_eq!(checks[0]["Name"], "Serf Health Status");
    assert_eq!(checks[0]["Status"], "passing");
    assert_eq!(checks[0]["Output"], "Agent alive and reachable");
    assert_eq!(checks[0]["ServiceID"], "");
    assert_eq!(checks[0]["ServiceTags"], json!([]));
    assert_eq!(checks[1]["CheckID"], "web-1:ttl");
    assert_eq!(checks[1]["ServiceName"], "web");
    assert_eq!(checks[1]["ServiceTags"], json!(["v1"]));

    // health/checks, health/node, health/state.
    let checks = agent.get_json("/v1/health/checks/web").await;
    assert_eq!(checks.as_array().unwrap().len(), 1);
    assert_eq!(checks[0]["CheckID"], "web-1:ttl");
    let node_checks = agent.get_json("/v1/health/node/dev").await;
    assert_eq!(node_checks.as_array().unwrap().len(), 2);
    assert_eq!(agent.get_json("/v1/health/node/other").await, json!([]));
}

#[tokio::test]
async fn health_state_lists_checks_by_status() {
    let agent = Agent::start().await;
    agent
        .register(ttl_service("p", "svc", Some("passing")))
        .await;
    agent.register(ttl_service("c", "svc", None)).await;
    let ids = |v: Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["CheckID"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(agent.get_json("/v1/health/state/any").await),
        set(&["serfHealth", "p:ttl", "c:ttl"])
    );
    assert_eq!(
        ids(agent.get_json("/v1/health/state/passing").await),
        set(&["serfHealth", "p:ttl"])
    );
    assert_eq!(
        ids(agent.get_json("/v1/health/state/critical").await),
        set(&["c:ttl"])
    );
    assert_eq!(
        ids(agent.get_json("/v1/health/state/warning").await),
        set(&[])
    );
}

#[tokio::test]
async fn catalog_shapes() {
    let agent = Agent::start().await;
    agent
        .register(
            json!({"ID": "web-1", "Name": "web", "Tags": ["b", "a"], "Address": "127.0.0.1",
                         "Port": 80}),
        )
        .await;
    agent
        .register(json!({"ID": "web-2", "Name": "web", "Tags": ["a", "c"]}))
        .await;

    // catalog/services: name → union of tags; the agent lists itself as `consul`.
    let services = agent.get_json("/v1/catalog/services").await;
    assert_eq!(services["consul"], json!([]));
    let tags: BTreeSet<String> = services["web"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(tags, set(&["a", "b", "c"]));
    assert_eq!(services["web"].as_array().unwrap().len(), 3, "deduplicated");

    // catalog/service/:name: flattened ServiceNode rows, no health.
    let rows = agent.get_json("/v1/catalog/service/web").await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let r = &rows[0];
    for key in [
        "ID",
        "Node",
        "Address",
        "Datacenter",
        "TaggedAddresses",
        "NodeMeta",
        "ServiceKind",
        "ServiceID",
        "ServiceName",
        "ServiceTags",
        "ServiceAddress",
        "ServiceWeights",
        "ServiceMeta",
        "ServicePort",
        "ServiceEnableTagOverride",
        "CreateIndex",
        "ModifyIndex",
    ] {
        assert!(r.get(key).is_some(), "catalog/service row lacks {key}: {r}");
    }
    assert!(r.get("Checks").is_none());
    assert_eq!(r["Node"], "dev");
    assert_eq!(r["ServiceID"], "web-1");
    assert_eq!(r["ServiceName"], "web");
    assert_eq!(r["ServicePort"], 80);
    assert_eq!(r["ServiceAddress"], "127.0.0.1");
    assert_eq!(r["TaggedAddresses"]["lan"], "127.0.0.1");
    assert_eq!(
        r["ServiceTaggedAddresses"]["lan_ipv4"],
        json!({"Address": "127.0.0.1", "Port": 80})
    );
    assert_eq!(r["ServiceWeights"], json!({"Passing": 1, "Warning": 1}));
    let r2 = &rows[1];
    assert_eq!(r2["ServicePort"], 0, "ServicePort is not omitempty");
    assert!(
        r2.get("ServiceTaggedAddresses").is_none(),
        "omitted when empty: {r2}"
    );
    assert_eq!(agent.get_json("/v1/catalog/service/none").await, json!([]));
    let consul = agent.get_json("/v1/catalog/service/consul").await;
    assert_eq!(consul[0]["ServicePort"], 8300);

    // catalog/nodes: this node.
    let nodes = agent.get_json("/v1/catalog/nodes").await;
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    for key in [
        "ID",
        "Node",
        "Address",
        "Datacenter",
        "TaggedAddresses",
        "Meta",
    ] {
        assert!(nodes[0].get(key).is_some(), "node lacks {key}");
    }
    assert_eq!(nodes[0]["Node"], "dev");
    assert_eq!(nodes[0]["Datacenter"], "dc1");

    // catalog/node/:node: the node and its services by ID; null for another node.
    let node = agent.get_json("/v1/catalog/node/dev").await;
    assert_eq!(node["Node"]["Node"], "dev");
    assert_eq!(node["Node"]["ID"], nodes[0]["ID"]);
    assert_eq!(keys(&node["Services"]), set(&["consul", "web-1", "web-2"]));
    assert_eq!(node["Services"]["web-1"]["Service"], "web");
    assert_eq!(agent.get_json("/v1/catalog/node/other").await, Value::Null);
}

#[tokio::test]
async fn agent_service_and_services() {
    let agent = Agent::start().await;
    agent
        .register(json!({"ID": "web-1", "Name": "web", "Port": 80, "Tags": ["v1"]}))
        .await;
    let services = agent.agent_services().await;
    assert_eq!(
        keys(&services),
        set(&["web-1"]),
        "the catalog-only consul service is not local"
    );
    let s = &services["web-1"];
    for key in [
        "ID",
        "Service",
        "Tags",
        "Meta",
        "Port",
        "Address",
        "Weights",
        "EnableTagOverride",
        "Datacenter",
    ] {
        assert!(s.get(key).is_some(), "AgentService lacks {key}: {s}");
    }
    assert!(
        s.get("ContentHash").is_none(),
        "only the single-service GET has a ContentHash"
    );

    let r = agent.get("/v1/agent/service/web-1").await;
    assert_eq!(r.status, 200);
    let one = r.json();
    let hash = one["ContentHash"].as_str().unwrap().to_string();
    assert!(!hash.is_empty());
    assert_eq!(r.header("X-Consul-ContentHash"), Some(hash.as_str()));
    assert_eq!(one["ID"], "web-1");
    agent
        .expect_error(
            "GET",
            "/v1/agent/service/nope",
            "",
            404,
            "unknown service ID: nope",
        )
        .await;

    // Hash-based blocking: parked until the content changes.
    let pending = spawn_get(
        &agent,
        format!("/v1/agent/service/web-1?hash={hash}&wait=30s"),
    );
    sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "an unchanged hash blocks");
    agent
        .register(json!({"ID": "web-1", "Name": "web", "Port": 80, "Tags": ["v2"]}))
        .await;
    let changed = timeout(PROMPTLY, pending)
        .await
        .expect("woken by the change")
        .unwrap()
        .json();
    assert_eq!(changed["Tags"], json!(["v2"]));
    assert_ne!(changed["ContentHash"].as_str().unwrap(), hash);
}

#[tokio::test]
async fn agent_health_endpoints_answer_with_the_status_code() {
    let agent = Agent::start().await;
    agent
        .register(ttl_service("p", "svc", Some("passing")))
        .await;
    agent
        .register(ttl_service("w", "svc", Some("warning")))
        .await;
    agent.register(ttl_service("c", "svc", None)).await;
    agent
        .register(ttl_service("solo", "solo", Some("passing")))
        .await;
    for (id, code, status) in [
        ("p", 200, "passing"),
        ("w", 429, "warning"),
        ("c", 503, "critical"),
    ] {
        let r = agent
            .get(&format!("/v1/agent/health/service/id/{id}"))
            .await;
        assert_eq!(r.status, code, "{id}");
        let v = r.json();
        assert_eq!(v["AggregatedStatus"], status);
        assert_eq!(v["Service"]["ID"], id);
        assert_eq!(v["Checks"].as_array().unwrap().len(), 1);
        let r = agent
            .get(&format!("/v1/agent/health/service/id/{id}?format=text"))
            .await;
        assert_eq!((r.status, r.body.as_str()), (code, status), "{id} as text");
    }
    let r = agent.get("/v1/agent/health/service/id/nope").await;
    assert_eq!(r.status, 404);

    // By name: an array, with the worst status in the code.
    let r = agent.get("/v1/agent/health/service/name/svc").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json().as_array().unwrap().len(), 3);
    let r = agent.get("/v1/agent/health/service/name/solo").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()[0]["AggregatedStatus"], "passing");
    let r = agent.get("/v1/agent/health/service/name/nope").await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn agent_self_members_and_status() {
    let agent = Agent::start().await;
    let me = agent.get_json("/v1/agent/self").await;
    assert_eq!(
        keys(&me),
        set(&[
            "Config",
            "DebugConfig",
            "Coord",
            "Member",
            "Stats",
            "Meta",
            "xDS"
        ])
    );
    assert_eq!(me["Config"]["Datacenter"], "dc1");
    assert_eq!(me["Config"]["NodeName"], "dev");
    assert_eq!(me["Config"]["Server"], true);
    assert!(me["Config"]["Version"].is_string());
    assert_eq!(me["Member"]["Name"], "dev");
    let leader = agent.get_json("/v1/status/leader").await;
    assert!(leader.is_string(), "the leader is a JSON string");
    assert_eq!(me["Stats"]["consul"]["leader_addr"], leader);
    assert_eq!(agent.get_json("/v1/status/peers").await, json!([leader]));

    let lan = agent.get_json("/v1/agent/members").await;
    let lan = lan.as_array().unwrap();
    assert_eq!(lan.len(), 1);
    assert_eq!(lan[0]["Name"], "dev");
    assert_eq!(lan[0]["Addr"], "127.0.0.1");
    assert_eq!(lan[0]["Status"], 1);
    assert_eq!(lan[0]["Tags"]["role"], "consul");
    assert_eq!(lan[0]["Tags"]["dc"], "dc1");
    assert_eq!(lan[0], me["Member"]);
    for q in ["?wan", "?wan=1", "?wan="] {
        let wan = agent.get_json(&format!("/v1/agent/members{q}")).await;
        assert_eq!(wan[0]["Name"], "dev.dc1", "{q}");
    }
}

// ---------------------------------------------------------------------------------------------
// Blocking queries and the index (§1.5)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn blocking_query_returns_promptly_on_a_change() {
    let agent = Agent::start().await;
    agent.register(ttl_service("web-1", "web", None)).await;
    let (_, index) = agent.health("web").await;

    let pending = spawn_get(
        &agent,
        format!("/v1/health/service/web?index={index}&wait=30s"),
    );
    sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "nothing changed yet, so the query blocks"
    );
    let started = Instant::now();
    agent.put_ok("/v1/agent/check/pass/web-1:ttl", "").await;
    let r = timeout(PROMPTLY, pending)
        .await
        .expect("woken by the change")
        .unwrap();
    assert!(started.elapsed() < PROMPTLY);
    assert_eq!(r.status, 200);
    assert!(r.index() > index);
    assert_eq!(r.json()[0]["Checks"][1]["Status"], "passing");

    // catalog/services wakes on a registration, with the Go client's `wait=<n>ms` form.
    let index = agent.get("/v1/catalog/services").await.index();
    let pending = spawn_get(
        &agent,
        format!("/v1/catalog/services?index={index}&wait=30000ms&stale="),
    );
    sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished());
    agent.register(json!({"Name": "api"})).await;
    let r = timeout(PROMPTLY, pending)
        .await
        .expect("woken by the registration")
        .unwrap();
    assert!(r.index() > index);
    assert!(r.json().get("api").is_some());

    // Waiting on a missing service: only its own registration wakes the query (Consul falls
    // back to the services table's index there, so any registration would answer the same
    // `[]` with a new index; here the index of a missing service moves only with it).
    let r = agent.get("/v1/health/service/ghost").await;
    let index = r.index();
    let pending = spawn_get(
        &agent,
        format!("/v1/health/service/ghost?index={index}&wait=30s"),
    );
    sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished());
    agent.register(json!({"Name": "other"})).await;
    sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "another service does not wake it");
    assert_eq!(agent.get("/v1/health/service/ghost").await.index(), index);
    agent.register(json!({"Name": "ghost"})).await;
    let r = timeout(PROMPTLY, pending).await.expect("woken").unwrap();
    assert!(r.index() > index);
    assert_eq!(r.json()[0]["Service"]["Service"], "ghost");
}

#[tokio::test]
async fn blocking_query_times_out_with_the_same_index() {
    let agent = Agent::start().await;
    agent.register(ttl_service("web-1", "web", None)).await;
    let (_, index) = agent.health("web").await;
    let started = Instant::now();
    let r = agent
        .get(&format!("/v1/health/service/web?index={index}&wait=1s"))
        .await;
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.index(),
        index,
        "a timeout answers the current (same) index"
    );
    assert_eq!(
        r.json().as_array().unwrap().len(),
        1,
        "with the current data"
    );
    assert!(took >= Duration::from_millis(900), "it waited: {took:?}");

    // An index from the future is not special: it blocks until the deadline too.
    let r = agent
        .get(&format!(
            "/v1/health/service/web?index={}&wait=1s",
            index + 1_000_000
        ))
        .await;
    assert_eq!(r.index(), index);

    // A status change of another service does not move catalog/services.
    let services_index = agent.get("/v1/catalog/services").await.index();
    let pending = spawn_get(
        &agent,
        format!("/v1/catalog/services?index={services_index}&wait=1s"),
    );
    agent.put_ok("/v1/agent/check/pass/web-1:ttl", "").await;
    let r = timeout(DEADLINE, pending).await.unwrap().unwrap();
    assert_eq!(r.index(), services_index);

    // index=0 is an ordinary read.
    let started = Instant::now();
    let r = agent.get("/v1/health/service/web?index=0&wait=30s").await;
    assert!(started.elapsed() < PROMPTLY);
    r.index();
}

#[tokio::test]
async fn no_op_writes_do_not_move_the_index() {
    let agent = Agent::start().await;
    let body = json!({"ID": "web-1", "Name": "web", "Tags": ["v1"], "Address": "127.0.0.1",
                      "Port": 80, "Meta": {"a": "b"},
                      "Check": {"CheckID": "web-1:ttl", "TTL": "60s"}});
    agent
        .put_ok(
            "/v1/agent/service/register?replace-existing-checks=true",
            &body.to_string(),
        )
        .await;
    let (_, i1) = agent.health("web").await;
    let services1 = agent.get("/v1/catalog/services").await.index();
    // The same registration again (as a worker's periodic safety-net re-registration does).
    for _ in 0..3 {
        agent
            .put_ok(
                "/v1/agent/service/register?replace-existing-checks=true",
                &body.to_string(),
            )
            .await;
    }
    assert_eq!(agent.health("web").await.1, i1);
    assert_eq!(agent.get("/v1/catalog/services").await.index(), services1);
    let r = agent
        .get(&format!("/v1/health/service/web?index={i1}&wait=1s"))
        .await;
    assert_eq!(r.index(), i1, "nothing woke the query");

    // A TTL pass on an already passing check: new output, same index.
    agent
        .put_ok("/v1/agent/check/pass/web-1:ttl?note=one", "")
        .await;
    let (_, i2) = agent.health("web").await;
    assert!(i2 > i1);
    agent
        .put_ok("/v1/agent/check/pass/web-1:ttl?note=two", "")
        .await;
    agent
        .put_ok(
            "/v1/agent/check/update/web-1:ttl",
            r#"{"Status":"passing","Output":"three"}"#,
        )
        .await;
    assert_eq!(agent.health("web").await.1, i2);
    assert_eq!(agent.agent_checks().await["web-1:ttl"]["Output"], "three");

    // But a real change does move it.
    agent.put_ok("/v1/agent/check/warn/web-1:ttl", "").await;
    assert!(agent.health("web").await.1 > i2);
}

#[tokio::test]
async fn the_index_never_goes_backwards_across_a_restart() {
    let mut first = Agent::start().await;
    let addr = first.addr;
    let client = first.client();
    first.register(ttl_service("web-1", "web", None)).await;
    // Many changes in a burst, then an immediate restart.
    for i in 0..50 {
        if i % 2 == 0 {
            client.check_pass("web-1:ttl", None).await.unwrap();
        } else {
            client.check_fail("web-1:ttl", None).await.unwrap();
        }
    }
    let before_health = first.health("web").await.1;
    let before_catalog = first.get("/v1/catalog/services").await.index();
    first.stop().await;

    let second = Agent::start_at(addr).await;
    // The restarted dev agent lost everything, but its indexes are still larger.
    let (entries, after_health) = second.health("web").await;
    assert!(entries.is_empty());
    let after_catalog = second.get("/v1/catalog/services").await.index();
    assert!(
        after_health > before_health,
        "health index went backwards: {before_health} -> {after_health}"
    );
    assert!(
        after_catalog > before_catalog,
        "catalog index went backwards: {before_catalog} -> {after_catalog}"
    );
    second.register(ttl_service("web-1", "web", None)).await;
    assert!(second.health("web").await.1 > before_health);
}
