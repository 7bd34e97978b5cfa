//! End to end, in a real browser: headless Chromium, driven through WebDriver (Debian's
//! `chromium` and `chromium-driver`), opens the balancer's dashboard in front of a dev agent,
//! three workers and the balancer, each its own process. The page must show the three
//! instances, count the requests sent through the balancer, and show a SIGKILLed worker as
//! gone or ejected within 5 s, and a dead agent as a stale view. Screenshots go to
//! `target/dashboard*.png`.
//!
//! Without a browser the test says why it did not run and passes, except in CI (`CI=true`),
//! where `.ci/run` installs the browser and a missing one fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;

/// The longest a SIGKILLed worker may look healthy on the page.
const SHOWN_GONE_WITHIN: Duration = Duration::from_secs(5);

/// Starts `chromedriver` and waits until it answers.
async fn start_driver(path: &Path) -> Daemon {
    let addr = free_addr();
    let mut cmd = Command::new(path);
    cmd.arg(format!("--port={}", addr.port()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let d = Daemon::spawn(&mut cmd, addr);
    wait_for("chromedriver answers", DEADLINE, || async {
        matches!(get(d.addr, "/status").await, Ok(r) if r.status == 200)
    })
    .await;
    d
}

/// Each instance row of the page: (ID, state, requests), in page order.
async fn rows(page: &Client) -> Vec<(String, String, Option<u64>)> {
    let v = page
        .execute(
            "return [...document.querySelectorAll('tr.instance')].map(r => \
               [r.dataset.id, r.dataset.state, r.querySelector('td.requests').firstChild.textContent]);",
            vec![],
        )
        .await
        .expect("the page answers a script");
    v.as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r[0].as_str().unwrap_or_default().to_string(),
                        r[1].as_str().unwrap_or_default().to_string(),
                        r[2].as_str().and_then(|n| n.trim().parse().ok()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_page<F>(
    page: &Client,
    what: &str,
    within: Duration,
    ok: F,
) -> Vec<(String, String, Option<u64>)>
where
    F: Fn(&[(String, String, Option<u64>)]) -> bool,
{
    let end = Instant::now() + within;
    loop {
        let r = rows(page).await;
        if ok(&r) {
            return r;
        }
        assert!(
            Instant::now() < end,
            "timed out after {within:?}: {what}; the page shows {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(page: &Client, name: &str) -> PathBuf {
    let png = page.screenshot().await.expect("a screenshot");
    let path = target_dir().join(name);
    std::fs::create_dir_all(target_dir()).expect("target/ exists");
    std::fs::write(&path, png).expect("the screenshot is written");
    eprintln!("screenshot: {}", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let driver = program("CHROMEDRIVER", &["chromedriver"]);
    let browser = program("CHROME", &["chromium", "chromium-browser", "google-chrome"]);
    let (driver, browser) = match (driver, browser) {
        (Some(d), Some(b)) => (d, b),
        (d, b) => {
            let missing = if d.is_none() {
                "chromedriver"
            } else {
                "chromium"
            };
            let why = format!(
                "{missing} not found on PATH (install Debian's `chromium` and `chromium-driver`, \
                 or set CHROMEDRIVER / CHROME); {} found",
                if b.is_some() {
                    "chromium"
                } else if d.is_some() {
                    "chromedriver"
                } else {
                    "neither"
                }
            );
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the browser test cannot run: {why}"
            );
            eprintln!("SKIPPED dashboard_in_a_real_browser: {why}");
            return;
        }
    };

    let mut c = Cluster::start(3).await;
    let driver = start_driver(&driver).await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": browser,
            // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,620", "--hide-scrollbars"],
        }),
    );
    let page = ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://{}", driver.addr))
        .await
        .expect("a WebDriver session in headless Chromium");
    let url = format!("http://{}/", c.admin);
    page.goto(&url).await.expect("the dashboard loads");

    // Three instances, all passing.
    let ids: Vec<String> = (1..=3).map(worker_id).collect();
    let shown = wait_page(&page, "three passing instances", DEADLINE, |r| {
        r.len() == 3
            && r.iter()
                .all(|(id, st, _)| ids.contains(id) && st == "passing")
    })
    .await;

    // 30 requests through the balancer: each instance's count moves by 10.
    let before: Vec<(String, u64)> = shown
        .iter()
        .map(|(id, _, n)| (id.clone(), n.unwrap_or(0)))
        .collect();
    let answers = c.curl(30).await;
    let t = tally(&answers);
    assert!(t.values().all(|n| *n == 10), "{t:?}");
    wait_page(
        &page,
        "every count moved by 10",
        Duration::from_secs(5),
        |r| {
            before
                .iter()
                .all(|(id, n)| r.iter().any(|(rid, _, m)| rid == id && *m == Some(n + 10)))
        },
    )
    .await;
    screenshot(&page, "dashboard.png").await;

    // Everything the page loaded came from the admin listener: no CDN, works offline.
    let resources = page
        .execute(
            "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)];",
            vec![],
        )
        .await
        .unwrap();
    for r in resources.as_array().unwrap() {
        let r = r.as_str().unwrap();
        assert!(r.starts_with(&url), "the page loaded {r} from elsewhere");
    }

    // SIGKILL worker 2 under a light, steady load: within 5 s the page shows it gone
    // (Consul removed it) or ejected (the balancer stopped sending it requests).
    let load = Load::start(c.listen, Duration::from_millis(50), Duration::from_secs(60));
    load.wait_traffic(&worker_id(2), 0, DEADLINE).await;
    let killed = Instant::now();
    c.worker(2).kill();
    let gone = worker_id(2);
    wait_page(
        &page,
        "web-2 shown gone or ejected",
        SHOWN_GONE_WITHIN,
        |r| {
            r.iter()
                .any(|(id, st, _)| *id == gone && (st == "gone" || st == "ejected"))
        },
    )
    .await;
    eprintln!(
        "the page showed the SIGKILLed worker gone or ejected after {:?}",
        killed.elapsed()
    );
    // The timeline names it, once the change has reached the page.
    wait_page(&page, "the timeline names web-2's removal", DEADLINE, |r| {
        r.iter().any(|(id, st, _)| *id == gone && st == "gone")
    })
    .await;
    let timeline = page
        .execute(
            "return document.getElementById('events').textContent;",
            vec![],
        )
        .await
        .unwrap();
    let timeline = timeline.as_str().unwrap_or_default();
    assert!(
        timeline.contains("removed") && timeline.contains(&gone),
        "{timeline}"
    );
    load.finish().await;
    // A second after the last poll, so that the rates settle before the picture is taken.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    screenshot(&page, "dashboard-after-sigkill.png").await;

    // The agent dies: the page says plainly that the balancer routes on what it last knew.
    c.agent.take().expect("the agent runs").kill();
    let end = Instant::now() + DEADLINE;
    loop {
        let banner = page
            .execute(
                "const b = document.querySelector('p.banner.stale'); return b ? b.textContent : null;",
                vec![],
            )
            .await
            .unwrap();
        if let Some(text) = banner.as_str() {
            assert!(
                text.contains("STALE") && text.contains("last known"),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < end, "no stale banner after the agent died");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    screenshot(&page, "dashboard-stale.png").await;
    page.close().await.expect("the browser session closes");
}
