//! `?filter=` on the embedded dev agent, over real HTTP (`consul-api.md` §1.4, §1.11).
//!
//! Each test starts its own agent in-process on `127.0.0.1:0`, registers a few services, and
//! checks which items a go-bexpr expression keeps on every read that supports `filter`, and
//! Consul's answer to a bad expression: a 500 carrying the evaluator's error.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{spawn_get, Agent, PROMPTLY};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use tokio::time::timeout;

const PREFIX: &str = "Failed to create boolean expression evaluator: ";

/// `?filter=<expr>`, percent-encoded.
fn filter(expr: &str) -> String {
    format!("filter={}", utf8_percent_encode(expr, NON_ALPHANUMERIC))
}

impl Agent {
    /// Service IDs of `health/service/web` under a filter (and any extra parameters).
    async fn health_ids(&self, expr: &str, extra: &str) -> Vec<String> {
        let r = self
            .get(&format!("/v1/health/service/web?{}{extra}", filter(expr)))
            .await;
        ids(&r.ok_json(), "/Service/ID")
    }

    /// Asserts a GET fails with exactly this status and plain-text body.
    async fn expect_get_error(&self, path: &str, status: u16, text: &str) {
        self.expect_error("GET", path, "", status, text).await;
    }
}

/// The string at `pointer` in each element of a JSON array.
fn ids(v: &Value, pointer: &str) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|e| e.pointer(pointer).unwrap().as_str().unwrap().to_string())
        .collect()
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// Three `web` instances and one `db`, each with a TTL check in the given state.
async fn fleet() -> Agent {
    let agent = Agent::start().await;
    for (id, name, tags, meta, port, status) in [
        (
            "web-1",
            "web",
            json!(["v1", "primary"]),
            json!({"version": "1", "env": "prod"}),
            8080,
            "passing",
        ),
        (
            "web-2",
            "web",
            json!(["v1"]),
            json!({"version": "2", "env": "prod"}),
            8081,
            "warning",
        ),
        (
            "web-3",
            "web",
            json!(["v2", "canary"]),
            json!({}),
            8082,
            "critical",
        ),
        (
            "db-1",
            "db",
            json!([]),
            json!({"version": "1"}),
            5432,
            "passing",
        ),
    ] {
        agent
            .register(json!({
                "ID": id, "Name": name, "Tags": tags, "Meta": meta, "Port": port,
                "Address": "127.0.0.1",
                "Check": {"CheckID": format!("{id}:ttl"), "TTL": "60s", "Status": status},
            }))
            .await;
    }
    agent
}

#[tokio::test]
async fn health_service_by_meta() {
    let agent = fleet().await;
    for (expr, want) in [
        (r#"Service.Meta.version == "1""#, vec!["web-1"]),
        (r#"Service.Meta["version"] == "2""#, vec!["web-2"]),
        // A missing key is unequal to anything.
        (r#"Service.Meta.version != "1""#, vec!["web-2", "web-3"]),
        (r#""version" in Service.Meta"#, vec!["web-1", "web-2"]),
        ("Service.Meta is empty", vec!["web-3"]),
        ("Service.Meta.env == prod", vec!["web-1", "web-2"]),
        (
            r#"Service.Meta.version matches "^[12]$""#,
            vec!["web-1", "web-2"],
        ),
        (
            r#"Service.Meta.env == "prod" and Service.Port == 8081"#,
            vec!["web-2"],
        ),
        (
            r#"Service.Meta.version == "1" or Service.ID == "web-3""#,
            vec!["web-1", "web-3"],
        ),
        (r#"Service.Meta.version == "3""#, vec![]),
    ] {
        assert_eq!(agent.health_ids(expr, "").await, want, "{expr}");
    }
}

#[tokio::test]
async fn health_service_by_tags_with_and_without_tag_parameters() {
    let agent = fleet().await;
    for (expr, extra, want) in [
        (r#""v1" in Service.Tags"#, "", vec!["web-1", "web-2"]),
        (r#""v1" not in Service.Tags"#, "", vec!["web-3"]),
        (r#"Service.Tags contains "canary""#, "", vec!["web-3"]),
        (
            r#"Service.Tags not contains "v2""#,
            "",
            vec!["web-1", "web-2"],
        ),
        // Exact and case-sensitive, unlike ?tag=.
        (r#""V1" in Service.Tags"#, "", vec![]),
        // Both apply.
        (r#""primary" not in Service.Tags"#, "&tag=v1", vec!["web-2"]),
        ("Service.Tags is not empty", "&tag=V2", vec!["web-3"]),
    ] {
        assert_eq!(agent.health_ids(expr, extra).await, want, "{expr} {extra}");
    }
}

#[tokio::test]
async fn health_service_by_checks_matches_any_check() {
    let agent = fleet().await;
    // Every entry carries the node's passing serfHealth check, so any-element semantics
    // keep them all here.
    assert_eq!(
        agent.health_ids(r#"Checks.Status == "passing""#, "").await,
        ["web-1", "web-2", "web-3"]
    );
    assert_eq!(
        agent.health_ids(r#"Checks.Status == "critical""#, "").await,
        ["web-3"]
    );
    assert_eq!(
        agent.health_ids(r#"Checks.Status != "passing""#, "").await,
        ["web-2", "web-3"],
        "some check is not passing"
    );
    // `?passing` as an expression.
    assert_eq!(
        agent
            .health_ids(r#"not (Checks.Status != "passing")"#, "")
            .await,
        ["web-1"]
    );
    assert_eq!(
        agent
            .health_ids(r#"Checks.CheckID contains "web-2""#, "")
            .await,
        ["web-2"]
    );
    // Combined with ?passing, which drops warning and critical on its own.
    assert_eq!(
        agent
            .health_ids(r#"Service.Meta.env == "prod""#, "&passing")
            .await,
        ["web-1"]
    );
    assert_eq!(
        agent.health_ids("Node.Node == dev", "&passing=1").await,
        ["web-1"]
    );
}

#[tokio::test]
async fn agent_services_checks_and_members() {
    let agent = fleet().await;
    let services = |expr: &'static str| {
        let agent = &agent;
        async move {
            let r = agent
                .get(&format!("/v1/agent/services?{}", filter(expr)))
                .await;
            keys(&r.ok_json())
        }
    };
    assert_eq!(
        services(r#"Service == "web""#).await,
        ["web-1", "web-2", "web-3"]
    );
    assert_eq!(services(r#"Meta.version == "1""#).await, ["db-1", "web-1"]);
    assert_eq!(services(r#""v1" in Tags"#).await, ["web-1", "web-2"]);
    assert_eq!(services("Port == 5432").await, ["db-1"]);
    assert_eq!(
        services(r#"Service == "web" and Tags is empty"#).await,
        Vec::<String>::new()
    );
    assert_eq!(
        services(r#"Datacenter == "dc1" and ID matches "-[13]$""#).await,
        ["db-1", "web-1", "web-3"]
    );

    let checks = agent
        .get(&format!(
            "/v1/agent/checks?{}",
            filter(r#"ServiceName == "web" and Status != "passing""#)
        ))
        .await;
    assert_eq!(keys(&checks.ok_json()), ["web-2:ttl", "web-3:ttl"]);

    let members = agent
        .get(&format!(
            "/v1/agent/members?{}",
            filter("Tags.role == consul")
        ))
        .await;
    assert_eq!(ids(&members.ok_json(), "/Name"), ["dev"]);
    let none = agent
        .get(&format!("/v1/agent/members?{}", filter("Status != 1")))
        .await;
    assert_eq!(none.ok_json(), json!([]));
}

#[tokio::test]
async fn catalog_and_other_health_reads() {
    let agent = fleet().await;
    let get = |path: String| {
        let agent = &agent;
        async move { agent.get(&path).await.ok_json() }
    };
    // catalog/services filters the service nodes, then lists what is left.
    assert_eq!(
        get(format!(
            "/v1/catalog/services?{}",
            filter(r#"ServiceMeta.version == "1""#)
        ))
        .await,
        json!({"db": [], "web": ["primary", "v1"]})
    );
    assert_eq!(
        get(format!(
            "/v1/catalog/services?{}",
            filter(r#"ServiceName == "consul""#)
        ))
        .await,
        json!({"consul": []})
    );
    let rows = get(format!(
        "/v1/catalog/service/web?{}",
        filter("ServicePort != 1 and ServiceAddress == `127.0.0.1`")
    ))
    .await;
    assert_eq!(ids(&rows, "/ServiceID"), ["web-1", "web-2", "web-3"]);
    let rows = get(format!(
        "/v1/catalog/service/web?tag=v1&{}",
        filter(r#"ServiceMeta.version == "2" and Node == "dev""#)
    ))
    .await;
    assert_eq!(ids(&rows, "/ServiceID"), ["web-2"]);

    let checks = get(format!(
        "/v1/health/checks/web?{}",
        filter(r#"Status == "warning""#)
    ))
    .await;
    assert_eq!(ids(&checks, "/CheckID"), ["web-2:ttl"]);
    let checks = get(format!(
        "/v1/health/state/any?{}",
        filter(r#"ServiceName == "" or ServiceID == "db-1""#)
    ))
    .await;
    assert_eq!(ids(&checks, "/CheckID"), ["db-1:ttl", "serfHealth"]);
    let checks = get(format!(
        "/v1/health/state/passing?{}",
        filter(r#""primary" in ServiceTags"#)
    ))
    .await;
    assert_eq!(ids(&checks, "/CheckID"), ["web-1:ttl"]);
    let checks = get(format!(
        "/v1/health/node/dev?{}",
        filter(r#"CheckID == "serfHealth""#)
    ))
    .await;
    assert_eq!(ids(&checks, "/CheckID"), ["serfHealth"]);

    let nodes = get(format!(
        "/v1/catalog/nodes?{}",
        filter(r#"Meta["consul-version"] is not empty"#)
    ))
    .await;
    assert_eq!(ids(&nodes, "/Node"), ["dev"]);
    let node = get(format!(
        "/v1/catalog/node/dev?{}",
        filter(r#"Service == "db""#)
    ))
    .await;
    assert_eq!(keys(&node["Services"]), ["db-1"]);
}

#[tokio::test]
async fn bad_expressions_are_consuls_500_with_the_evaluator_error() {
    let agent = fleet().await;
    // The exact text of Consul issue #7338 (`ServicesWithFilter("foo")`).
    let foo = format!(
        r#"{PREFIX}1:4 (3): no match found, expected: "!=", ".", "==", "[", [ \t\r\n] or [a-zA-Z0-9_]"#
    );
    for path in [
        "/v1/agent/services",
        "/v1/agent/checks",
        "/v1/agent/members",
        "/v1/health/service/web",
        "/v1/health/checks/web",
        "/v1/health/node/dev",
        "/v1/health/state/any",
        "/v1/catalog/services",
        "/v1/catalog/service/web",
        "/v1/catalog/nodes",
        "/v1/catalog/node/dev",
    ] {
        agent
            .expect_get_error(&format!("{path}?filter=foo"), 500, &foo)
            .await;
    }
    for (expr, text) in [
        // Consul issue #9441: an unquoted address.
        (
            "Address == 10.10.10.10",
            r#"1:17 (16): rule "number": Invalid number literal"#,
        ),
        (
            r#"Service.ID == "web"#,
            r#"1:19 (18): rule "string": Unterminated string literal"#,
        ),
        (
            r#"(Service.ID == "web""#,
            r#"1:21 (20): rule "grouping": Unmatched parentheses"#,
        ),
        (
            r#""v1" in "Service.Tags""#,
            r#"1:9 (8): rule "match": Invalid selector"#,
        ),
    ] {
        agent
            .expect_get_error(
                &format!("/v1/health/service/web?{}", filter(expr)),
                500,
                &format!("{PREFIX}{text}"),
            )
            .await;
    }
    // A value the field's type refuses fails once there is an item to evaluate.
    agent
        .expect_get_error(
            &format!(
                "/v1/health/service/web?{}",
                filter(r#"Service.Port == "http""#)
            ),
            500,
            &format!(
                r#"{PREFIX}Failed to coerce value "http" for selector "Service.Port": strconv.ParseInt: parsing "http": invalid syntax"#
            ),
        )
        .await;
    agent
        .expect_get_error(
            &format!("/v1/agent/services?{}", filter(r#"Tags == "v1""#)),
            500,
            &format!(r#"{PREFIX}Invalid match operator "Equal" for selector "Tags""#),
        )
        .await;
    let r = agent
        .get(&format!(
            "/v1/health/service/web?{}",
            filter(r#"Service.ID matches "(""#)
        ))
        .await;
    assert_eq!(r.status, 500);
    assert!(
        r.body.starts_with(&format!(
            r#"{PREFIX}Failed to compile regular expression "(": "#
        )),
        "{}",
        r.body
    );
    // Parameter errors come first, as Consul checks them before building the evaluator.
    agent
        .expect_get_error(
            "/v1/health/service/web?index=abc&filter=foo",
            400,
            "Invalid index",
        )
        .await;
    agent
        .expect_get_error(
            "/v1/health/service/?filter=foo",
            400,
            "Missing service name",
        )
        .await;
    agent
        .expect_get_error(
            "/v1/agent/members?wan&segment=x&filter=foo",
            400,
            "Cannot provide a segment with wan=true",
        )
        .await;
    // An empty filter is no filter; a blank one is a parse error.
    let all = agent.get("/v1/health/service/web?filter=").await;
    assert_eq!(
        ids(&all.ok_json(), "/Service/ID"),
        ["web-1", "web-2", "web-3"]
    );
    let blank = agent.get("/v1/health/service/web?filter=%20").await;
    assert_eq!(blank.status, 500);
    assert!(blank.body.starts_with(PREFIX), "{}", blank.body);
}

#[tokio::test]
async fn filtered_reads_are_cached_apart_and_block_like_any_read() {
    let agent = fleet().await;
    let v1 = filter(r#""v1" in Service.Tags"#);
    // Same store version, three reads: each gets its own answer, not the cached neighbour's.
    let all = agent.get("/v1/health/service/web").await;
    let only_v1 = agent.get(&format!("/v1/health/service/web?{v1}")).await;
    let canary = agent
        .get(&format!(
            "/v1/health/service/web?{}",
            filter(r#""canary" in Service.Tags"#)
        ))
        .await;
    assert_eq!(
        ids(&all.ok_json(), "/Service/ID"),
        ["web-1", "web-2", "web-3"]
    );
    assert_eq!(ids(&only_v1.ok_json(), "/Service/ID"), ["web-1", "web-2"]);
    assert_eq!(ids(&canary.ok_json(), "/Service/ID"), ["web-3"]);
    let again = agent.get(&format!("/v1/health/service/web?{v1}")).await;
    assert_eq!(
        again.body, only_v1.body,
        "a repeated read is the same answer"
    );
    let index = only_v1.consul_index.unwrap();
    assert_eq!(
        all.consul_index,
        Some(index),
        "the index does not depend on the filter"
    );
    // A parameter value holding `&filter=` is not a filter, and must not share its cache slot.
    let expr = r#"Service.ID == "web-1""#;
    let tagged = agent
        .get(&format!("/v1/health/service/web?tag=v1&{}", filter(expr)))
        .await;
    let odd_tag = utf8_percent_encode(&format!("v1&filter={expr}"), NON_ALPHANUMERIC).to_string();
    let lookalike = agent
        .get(&format!("/v1/health/service/web?tag={odd_tag}"))
        .await;
    assert_eq!(ids(&tagged.ok_json(), "/Service/ID"), ["web-1"]);
    assert_eq!(
        ids(&lookalike.ok_json(), "/Service/ID"),
        Vec::<String>::new(),
        "no instance has that tag"
    );

    // A blocking filtered read wakes on a change and answers with the filter applied.
    let pending = spawn_get(
        &agent,
        format!("/v1/health/service/web?{v1}&index={index}&wait=30s"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "blocks until a change");
    agent
        .register(json!({"ID": "web-4", "Name": "web", "Tags": ["v1"], "Port": 8083}))
        .await;
    let r = timeout(PROMPTLY, pending)
        .await
        .expect("woken by the change")
        .unwrap();
    let (new_index, body) = (r.consul_index.unwrap(), r.json());
    assert!(new_index > index);
    assert_eq!(ids(&body, "/Service/ID"), ["web-1", "web-2", "web-4"]);
}
