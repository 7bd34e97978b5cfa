//! The binary's command line: help and version exit 0, bad flags and bad configuration exit 64
//! with a message that names the problem, a taken port exits 1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::run_worker_to_end;

#[test]
fn help_and_version_exit_zero() {
    let (status, out, _) = run_worker_to_end(&["--help"]);
    assert_eq!(status.code(), Some(0));
    for flag in [
        "--service",
        "--listen",
        "--advertise",
        "--id",
        "--tag",
        "--meta",
        "--message",
        "--consul-addr",
        "--consul-token",
        "--check-interval",
        "--check-timeout",
        "--deregister-after",
        "--drain-delay",
        "--shutdown-grace",
        "--admin",
        "WORKER_ADMIN",
        "--admin-token",
        "--delay",
        "CONSUL_HTTP_ADDR",
    ] {
        assert!(out.contains(flag), "--help mentions {flag}:\n{out}");
    }
    let (status, out, _) = run_worker_to_end(&["--version"]);
    assert_eq!(status.code(), Some(0));
    assert!(out.starts_with("worker "), "{out}");
}

#[test]
fn bad_flags_exit_64_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--check-interval", "2"], "missing unit"),
        (&["--drain-delay", "soon"], "invalid duration"),
        (&["--listen", "not-an-address"], "--listen"),
        (&["--listen", "0.0.0.0:0"], "--advertise"),
        (&["--advertise", "0.0.0.0"], "any"),
        (&["--meta", "consul-x=1"], "reserved"),
        (&["--consul-addr", "https://127.0.0.1:8501"], "https"),
        (&["--admin", "nonsense"], "--admin"),
        (&["--admin", "0.0.0.0:10001"], "loopback"),
        (&["--admin", "127.0.0.1:9001"], "service port"),
        (&["--listen", "127.0.0.1:65000"], "--admin"),
        (&["--admin", "off", "--admin-token", "x"], "--admin is off"),
    ];
    for (args, needle) in cases {
        let (status, _, err) = run_worker_to_end(args);
        assert_eq!(status.code(), Some(64), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: stderr should mention {needle:?}:\n{err}"
        );
    }
}

#[test]
fn a_bad_worker_admin_variable_exits_64() {
    let out = std::process::Command::new(common::worker_bin())
        .env_remove("CONSUL_HTTP_ADDR")
        .env("WORKER_ADMIN", "192.0.2.1:10001")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run worker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn a_taken_admin_port_exits_69() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, _, err) =
        run_worker_to_end(&["--listen", "127.0.0.1:0", "--admin", &addr, "--no-register"]);
    assert_eq!(status.code(), Some(69), "EX_UNAVAILABLE: {err}");
    assert!(
        err.contains("could not listen") && err.contains(&addr),
        "{err}"
    );
}

#[test]
fn a_taken_port_exits_69() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, _, err) = run_worker_to_end(&["--listen", &addr, "--no-register"]);
    assert_eq!(status.code(), Some(69), "EX_UNAVAILABLE: {err}");
    assert!(err.contains("could not listen"), "{err}");
}
