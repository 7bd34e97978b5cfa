"""A real third-party Consul client (py-consul) drives the dev agent.

Starts `discovery agent --dev` on a free loopback port, serves a health endpoint from this
process, and walks py-consul through what its users do: register with an HTTP check, wait
for it to pass, block on health.service until a change, TTL checks, members, leader,
deregister. Any mismatch with Consul's behaviour raises.

Usage: python3 tests/interop/py_consul_smoke.py [path/to/discovery]
"""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import consul

RESULTS = {"passed": 0, "failed": 0}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, fn, deadline=15.0):
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # the agent may still be starting
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def case(name):
    def wrap(fn):
        def run(*args):
            try:
                fn(*args)
                RESULTS["passed"] += 1
                print(f"ok   {name}")
            except Exception as e:
                RESULTS["failed"] += 1
                print(f"FAIL {name}: {e!r}")
        return run
    return wrap


class Health(http.server.BaseHTTPRequestHandler):
    healthy = True

    def do_GET(self):
        code = 200 if Health.healthy else 503
        body = b"ok" if Health.healthy else b"down"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@case("register with an HTTP check; it starts critical and turns passing")
def register_http(c, health_port):
    c.agent.service.register(
        "web", service_id="web-1", address="127.0.0.1", port=health_port, tags=["v1"],
        check=consul.Check.http(f"http://127.0.0.1:{health_port}/health", interval="1s", timeout="1s"),
    )
    services = c.agent.services()
    assert "web-1" in services, services
    assert services["web-1"]["Port"] == health_port
    wait_for("web-1 passing", lambda: c.health.service("web", passing=True)[1])
    _, nodes = c.health.service("web", passing=True)
    assert nodes[0]["Service"]["ID"] == "web-1"
    assert nodes[0]["Service"]["Tags"] == ["v1"]


@case("the HTTP check going critical removes the instance from passing")
def http_check_flips(c, _):
    Health.healthy = False
    wait_for("web-1 critical", lambda: c.health.service("web", passing=True)[1] == [])
    Health.healthy = True
    wait_for("web-1 passing again", lambda: c.health.service("web", passing=True)[1])


@case("a blocking health.service returns on a change, with a higher index")
def blocking_query(c, health_port):
    index, _ = c.health.service("web")
    assert int(index) > 0
    result = {}

    def block():
        result["t0"] = time.monotonic()
        result["answer"] = c.health.service("web", index=index, wait="30s")
        result["t1"] = time.monotonic()

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.5)
    c.agent.service.register("web", service_id="web-2", address="127.0.0.1", port=health_port)
    t.join(timeout=20)
    assert not t.is_alive(), "blocking query did not return on a change"
    new_index, nodes = result["answer"]
    assert int(new_index) > int(index), (new_index, index)
    assert {n["Service"]["ID"] for n in nodes} == {"web-1", "web-2"}
    assert result["t1"] - result["t0"] < 15


@case("a blocking query with nothing changing returns the same index after wait")
def blocking_timeout(c, _):
    index, _ = c.health.service("web")
    t0 = time.monotonic()
    new_index, _ = c.health.service("web", index=index, wait="1s")
    assert new_index == index, (new_index, index)
    assert time.monotonic() - t0 >= 0.9


@case("TTL checks: critical at first, pass/warn/fail set the status")
def ttl_checks(c, _):
    c.agent.service.register("api", service_id="api-1", port=1, check=consul.Check.ttl("30s"))
    checks = c.agent.checks()
    assert checks["service:api-1"]["Status"] == "critical", checks
    c.agent.check.ttl_pass("service:api-1", "all good")
    checks = c.agent.checks()
    assert checks["service:api-1"]["Status"] == "passing"
    assert checks["service:api-1"]["Output"] == "all good"
    c.agent.check.ttl_warn("service:api-1")
    assert c.health.service("api", passing=True)[1] == []
    c.agent.check.ttl_fail("service:api-1")
    assert c.agent.checks()["service:api-1"]["Status"] == "critical"


@case("members, leader and self look like a one-node Consul")
def members_and_leader(c, _):
    members = c.agent.members()
    assert len(members) == 1 and members[0]["Status"] == 1, members
    leader = c.status.leader()
    assert leader.endswith(":8300"), leader
    me = c.agent.self()
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Stats"]["consul"]["leader_addr"] == leader
    assert c.status.peers() == [leader]


@case("catalog services list the consul service and ours")
def catalog(c, _):
    _, services = c.catalog.services()
    assert "consul" in services and "web" in services, services
    assert services["web"] == ["v1"], services


@case("deregister removes the service; unknown IDs are refused")
def deregister(c, _):
    c.agent.service.deregister("web-2")
    c.agent.service.deregister("web-1")
    c.agent.service.deregister("api-1")
    assert c.health.service("web")[1] == []
    assert c.agent.services() == {}
    # Consul answers 404 for an unknown ID; py-consul turns that into False.
    assert c.agent.service.deregister("no-such-service") is False


@case("a malformed registration gets Consul's 400 text and changes nothing")
def bad_registration(c, _):
    try:
        c.agent.service.register("")
    except consul.ConsulException as e:
        assert "Missing service name" in str(e), e
    else:
        raise AssertionError("registration without a name succeeded")
    assert c.agent.services() == {}


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "debug", "discovery")
    port = free_port()
    agent = subprocess.Popen(
        [binary, "agent", "--dev", "--http-addr", f"127.0.0.1:{port}", "--node", "interop"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = consul.Consul(host="127.0.0.1", port=port)
        wait_for("the dev agent", lambda: c.status.leader())
        health_port = server.server_address[1]
        for test in (register_http, http_check_flips, blocking_query, blocking_timeout,
                     ttl_checks, members_and_leader, catalog, deregister, bad_registration):
            test(c, health_port)
    finally:
        server.shutdown()
        agent.terminate()
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
    print(f"py-consul: {RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
