//! The catalog watcher and single-connection clients against the real embedded dev agent.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{service, Agent};
use discovery::HealthQuery;

#[tokio::test]
async fn a_single_connection_client_makes_calls_one_after_another() {
    let agent = Agent::start_quick().await;
    let c = agent.client().single_connection();
    c.register(&service("web-1", "web", 9001)).await.unwrap();
    for _ in 0..5 {
        let q = HealthQuery {
            passing: true,
            ..HealthQuery::default()
        };
        let (e, _) = tokio::time::timeout(Duration::from_secs(5), c.health_service("web", &q))
            .await
            .expect("answered in time")
            .unwrap();
        assert_eq!(e.len(), 1);
    }
}
