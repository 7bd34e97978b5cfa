//! A balancer that runs out of file descriptors blames no instance: a connect that fails with
//! EMFILE is this host's trouble, so the request gets a 503 saying so, the instance is neither
//! ejected nor counted as failing, and once descriptors are free again requests go through.
//!
//! Alone in its test binary: it lowers this process's descriptor limit (with `prlimit` on
//! itself) and fills the table, which would break any test running beside it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::raw::*;

/// Sets this process's soft and hard descriptor limits.
fn set_nofile(soft: u64, hard: u64) {
    let ok = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("prlimit (util-linux) runs")
        .success();
    assert!(ok, "prlimit --nofile={soft}:{hard}");
}

fn nofile() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].parse().unwrap(), f[4].parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_ejects_no_instance() {
    // An instance that closes each connection after answering: every request needs a new
    // upstream socket, so none can come from the pool.
    let up = RawUpstream::start(answer_then_close("Connection: close\r\n", Duration::ZERO)).await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/")).await;
    assert_eq!(c.length_response().await.text(), "GET 0");

    // Fill the descriptor table: no socket can be opened now.
    let (soft, hard) = nofile();
    set_nofile(soft.min(4096), hard);
    let mut hog = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(24), "EMFILE expected: {e}");
                break;
            }
        }
    }
    c.send(&get_req("/")).await;
    let r = c.length_response().await;
    drop(hog);
    set_nofile(soft, hard);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.text().contains("short of resources"), "{r:?}");

    let inst = lb.instance_status("web", "raw").await;
    assert_eq!(inst["ejected"], false, "{inst}");
    assert_eq!(inst["failures"], 0, "{inst}");
    assert_eq!(inst["ejections"], 0, "{inst}");
    // Descriptors are back: the same client connection is served again.
    c.send(&get_req("/")).await;
    let r = c.length_response().await;
    assert_eq!(r.status, 200, "{r:?}");
    lb.stop().await;
}
