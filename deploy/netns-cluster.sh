#!/usr/bin/env bash
# The Vagrant topology (a Consul server, the balancer, three workers) as network namespaces on one
# machine, plus a `client` host to send requests from. Used by CI (`tests/netns.rs`) and by hand.
#
#   deploy/netns-cluster.sh up   [BIN]   start the cluster, show how to reach it, stop on Ctrl-C
#   deploy/netns-cluster.sh test [BIN]   start the cluster, run the checks, exit 0 (pass) or 1 (fail)
#
# BIN is the multi-call `cluster` binary (default: `cargo build --bin cluster`, then
# target/debug/cluster). It runs `cluster agent` on the consul host (the embedded dev agent stands
# in for the Consul server), `cluster worker` on worker1..3 and `cluster balancer` on the balancer
# host, with the flags the VMs use.
#
# Safety (../shared/DESIGN.md, "Running several hosts on one machine"): the script re-executes
# itself inside `unshare --user --map-root-user --net --mount --pid --fork --kill-child
# --mount-proc`. That sandbox's own network namespace has nothing but `lo`, so no packet can leave
# the machine; /run is a private tmpfs holding /run/netns and the logs; and every process dies with
# the sandbox, whatever happens to this script. Hosts are namespaces inside it, each with one veth
# to a bridge that lives in its own namespace, on 10.231.0.0/24, a subnet that exists only there.
# Hosts are only ever talked to from inside another host's namespace (`ip netns exec client ...`).
#
# The processes log to /run/netns-cluster/*.log inside the sandbox (gone with it; printed when a
# check fails). Set NETNS_CLUSTER_LOGS=DIR to have them copied to DIR at the end.
#
# Exit status: 0 passed (or `up` stopped cleanly), 1 failed, 2 usage, 77 the sandbox cannot be
# created here (unshare refused, or a tool is missing): tests/netns.rs turns 77 into a failure
# unless SKIP_NETNS_TESTS=1.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
readonly SELF
readonly SUBNET_PREFIX=10.231.0
readonly CONSUL_IP=${SUBNET_PREFIX}.10
readonly BALANCER_IP=${SUBNET_PREFIX}.20
readonly CLIENT_IP=${SUBNET_PREFIX}.100
readonly WORKERS=(worker1 worker2 worker3)
readonly HOSTS=(consul balancer "${WORKERS[@]}" client)
readonly BRIDGE_NS=bridge
readonly SERVICE=web
readonly WORKER_PORT=9001
readonly LB_PORT=8080
readonly ADMIN_PORT=8081
readonly CONSUL_PORT=8500
readonly SANDBOX_FLAGS=(--user --map-root-user --net --mount --pid --fork --kill-child --mount-proc)

usage() {
	echo "usage: $0 up|test [BIN]" >&2
	exit 2
}

die() {
	echo "netns-cluster: error: $*" >&2
	exit 1
}

log() {
	printf '[%5.1fs] %s\n' "$(elapsed)" "$*"
}

# Seconds since the sandbox started, with a tenth.
elapsed() {
	local now=${EPOCHREALTIME/./}
	local start=${START_US:-$now}
	local d=$(((now - start) / 100000))
	printf '%d.%d' $((d / 10)) $((d % 10))
}

now_us() {
	echo "${EPOCHREALTIME/./}"
}

host_ip() {
	case $1 in
	consul) echo "$CONSUL_IP" ;;
	balancer) echo "$BALANCER_IP" ;;
	worker[0-9]) echo "${SUBNET_PREFIX}.$((20 + ${1#worker}))" ;;
	client) echo "$CLIENT_IP" ;;
	*) die "unknown host $1" ;;
	esac
}

# ---------------------------------------------------------------------------------------------
# Internal mode, run inside the client namespace: a steady stream of requests, one line per
# request ("<epoch µs sent> <curl exit>/<http code> <first word of the body> <ms taken>"), until STOP exists or
# the deadline (epoch seconds) passes.
# ---------------------------------------------------------------------------------------------
stream() {
	local url=$1 out=$2 stop=$3 deadline=$4 body rc code sent
	while [[ ! -e $stop ]] && ((${EPOCHREALTIME%.*} < deadline)); do
		rc=0
		sent=$(now_us)
		body=$(curl -sS --max-time 5 -w '\n%{http_code}' "$url" 2>&1) || rc=$?
		code=${body##*$'\n'}
		printf '%s %s/%s %s %s\n' "$sent" "$rc" "$code" "${body%% *}" $((($(now_us) - sent) / 1000)) >>"$out"
	done
}

if [[ ${1:-} == __stream ]]; then
	[[ ${NETNS_CLUSTER_SANDBOX:-} == 1 ]] || die "__stream runs only inside the sandbox"
	shift
	stream "$@"
	exit 0
fi

[[ $# -ge 1 && $# -le 2 ]] || usage
MODE=$1
[[ $MODE == up || $MODE == test ]] || usage

# ---------------------------------------------------------------------------------------------
# Outside the sandbox: find the binary, check the tools, then re-execute inside the sandbox.
# ---------------------------------------------------------------------------------------------
if [[ ${NETNS_CLUSTER_SANDBOX:-} != 1 ]]; then
	for tool in unshare ip curl setsid python3; do
		if ! command -v "$tool" >/dev/null; then
			echo "netns-cluster: cannot run here: '$tool' is not installed" >&2
			exit 77
		fi
	done
	BIN=${2:-}
	if [[ -z $BIN ]]; then
		root=$(dirname "$(dirname "$SELF")")
		echo "netns-cluster: building the cluster binary (cargo build --bin cluster)" >&2
		(cd "$root" && cargo build --bin cluster) || die "cargo build failed"
		BIN=${CARGO_TARGET_DIR:-$root/target}/debug/cluster
	fi
	BIN=$(readlink -f "$BIN") || die "no such binary: $BIN"
	[[ -f $BIN && -x $BIN ]] || die "not an executable: $BIN"
	# Probe everything the sandbox needs from the kernel: the namespaces, a tmpfs, a named network
	# namespace, a veth pair, and `ip netns exec` (which remounts /sys).
	probe='mount -t tmpfs probe /run && mkdir /run/netns && ip netns add probe &&
		ip link add probe0 netns probe type veth peer name probe1 && ip netns exec probe true'
	if ! err=$(unshare "${SANDBOX_FLAGS[@]}" sh -c "$probe" 2>&1); then
		echo "netns-cluster: cannot create the sandbox here: unshare ${SANDBOX_FLAGS[*]} with a named network namespace and a veth pair failed: $err" >&2
		echo "netns-cluster: (unprivileged user namespaces may be disabled, e.g. by sysctl kernel.unprivileged_userns_clone=0 or user.max_user_namespaces=0, an AppArmor restriction or a container's seccomp profile; or the veth module is missing)" >&2
		exit 77
	fi
	export NETNS_CLUSTER_SANDBOX=1 NETNS_CLUSTER_UNSHARE_PID=$$
	exec unshare "${SANDBOX_FLAGS[@]}" bash "$SELF" "$MODE" "$BIN"
fi

# ---------------------------------------------------------------------------------------------
# Inside the sandbox.
# ---------------------------------------------------------------------------------------------
BIN=$2
START_US=$(now_us)

# Refuse to run anywhere but in a fresh sandbox: we must be its init, and its network namespace
# must hold nothing but lo. (NETNS_CLUSTER_SANDBOX=1 set by hand lands here and stops.)
[[ $$ -eq 1 ]] || die "not inside the sandbox (pid $$, expected 1); run without NETNS_CLUSTER_SANDBOX"
links=$(ip -o link show | wc -l)
[[ $links -eq 1 ]] || die "the sandbox's network namespace has $links links, expected only lo"
ip link set lo up

mount -t tmpfs -o mode=0755 netns-cluster /run
mkdir -p /run/netns /run/netns-cluster
readonly LOGDIR=/run/netns-cluster
[[ -x $BIN ]] || die "cannot execute $BIN inside the sandbox (is it under /run?)"

declare -A PIDS=()
FAILED=0

# Stops the named processes: SIGTERM, then SIGKILL after a deadline.
stop_procs() {
	local name pid deadline
	local -a alive=()
	for name in "$@"; do
		pid=${PIDS[$name]:-}
		[[ -n $pid ]] || continue
		if kill -TERM "$pid" 2>/dev/null; then
			alive+=("$name")
		fi
	done
	deadline=$(($(now_us) + 8000000))
	for name in "${alive[@]}"; do
		pid=${PIDS[$name]}
		while kill -0 "$pid" 2>/dev/null && (($(now_us) < deadline)); do
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			echo "netns-cluster: $name (pid $pid) ignored SIGTERM; killing it" >&2
			kill -KILL "$pid" 2>/dev/null || true
		fi
		wait "$pid" 2>/dev/null || true
		unset "PIDS[$name]"
	done
}

dump_logs() {
	local f
	for f in "$LOGDIR"/*.log; do
		[[ -e $f ]] || continue
		echo "----- $(basename "$f") (last 80 lines) -----"
		tail -n 80 "$f"
	done
}

cleanup() {
	local rc=$? ns pid
	trap - EXIT INT TERM
	set +e
	((FAILED == 0)) || rc=1
	if [[ $rc -ne 0 && -z $INTERRUPTED ]]; then
		echo "netns-cluster: FAILED (exit $rc); process logs follow" >&2
		dump_logs >&2
	fi
	log "stopping: workers first (they deregister while the agent runs), then balancer, agent"
	stop_procs stream
	stop_procs "${WORKERS[@]}"
	stop_procs balancer
	stop_procs consul
	for ns in "${HOSTS[@]}" "$BRIDGE_NS"; do
		[[ -e /run/netns/$ns ]] || continue
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			echo "netns-cluster: killing leftover pid $pid in $ns" >&2
			kill -KILL "$pid" 2>/dev/null
		done
		ip netns del "$ns"
	done
	if [[ -n ${NETNS_CLUSTER_LOGS:-} ]]; then
		mkdir -p "$NETNS_CLUSTER_LOGS" && cp "$LOGDIR"/*.log "$NETNS_CLUSTER_LOGS"/ &&
			log "process logs copied to $NETNS_CLUSTER_LOGS"
	fi
	left=$(ip netns list)
	[[ -z $left ]] || echo "netns-cluster: namespaces left behind: $left" >&2
	log "stopped; exit $rc"
	# Leaving pid 1 ends the sandbox: the kernel kills anything still in it, and its /run goes.
	exit "$rc"
}
# Ctrl-C or SIGTERM: stop. In `up` mode, once the cluster runs, that is how it ends: exit 0.
INTERRUPTED=
ON_STOP_STATUS=
on_signal() {
	INTERRUPTED=$1
	echo
	log "got SIG$1"
	exit "${ON_STOP_STATUS:-$2}"
}
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

# ---------------------------------------------------------------------------------------------
# Topology.
# ---------------------------------------------------------------------------------------------
build_topology() {
	local host
	ip netns add "$BRIDGE_NS"
	ip -n "$BRIDGE_NS" link set lo up
	ip -n "$BRIDGE_NS" link add br0 type bridge stp_state 0
	ip -n "$BRIDGE_NS" link set br0 up
	for host in "${HOSTS[@]}"; do
		ip netns add "$host"
		ip -n "$host" link set lo up
		ip link add eth0 netns "$host" type veth peer name "v-$host" netns "$BRIDGE_NS"
		ip -n "$BRIDGE_NS" link set "v-$host" master br0 up
		ip -n "$host" addr add "$(host_ip "$host")/24" dev eth0
		ip -n "$host" link set eth0 up
	done
	# Still nothing but lo out here: every veth went straight into a namespace.
	links=$(ip -o link show | wc -l)
	[[ $links -eq 1 ]] || die "the sandbox's own namespace gained links"
	log "topology: bridge br0 in netns '$BRIDGE_NS'; $(for h in "${HOSTS[@]}"; do printf '%s=%s ' "$h" "$(host_ip "$h")"; done)"
}

# start NAME NETNS ARGS...: runs BIN ARGS in NETNS, in its own session (a terminal's Ctrl-C
# reaches only this script, which stops everything in order), logging to $LOGDIR/NAME.log.
# `ip netns exec` and `setsid` both exec, so $! is the component's own pid.
start() {
	local name=$1 ns=$2
	shift 2
	ip netns exec "$ns" setsid "$BIN" "$@" >"$LOGDIR/$name.log" 2>&1 </dev/null &
	PIDS[$name]=$!
}

in_client() {
	ip netns exec client "$@"
}

client_curl() {
	in_client curl -sS --max-time 5 "$@"
}

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds or the deadline passes.
wait_for() {
	local what=$1 secs=$2
	shift 2
	local deadline=$(($(now_us) + secs * 1000000))
	local name
	until "$@" >/dev/null 2>&1; do
		for name in "${!PIDS[@]}"; do
			if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
				echo "netns-cluster: $name exited while waiting for $what" >&2
				return 1
			fi
		done
		if (($(now_us) >= deadline)); then
			echo "netns-cluster: timed out after ${secs}s waiting for $what" >&2
			return 1
		fi
		sleep 0.2
	done
	log "ready: $what"
}

alive() {
	local name=$1
	kill -0 "${PIDS[$name]}" 2>/dev/null || die "$name exited early; see its log"
}

status_json() {
	client_curl "http://$BALANCER_IP:$ADMIN_PORT/status"
}

# The instance IDs currently in the balancer's rotation, sorted, space-separated.
rotation() {
	local json
	json=$(status_json) || return 1
	# Only the instances in rotation: /status also lists recently removed ones.
	python3 -c '
import json, sys
status = json.load(sys.stdin)
ids = [i["id"] for s in status["services"] for i in s.get("instances", [])]
print(" ".join(sorted(ids)))' <<<"$json"
}

rotation_is() {
	[[ $(rotation) == "$1" ]]
}

start_cluster() {
	local w ip
	start consul consul agent --dev --http-addr "0.0.0.0:$CONSUL_PORT" --node consul --advertise "$CONSUL_IP"
	wait_for "the dev agent on $CONSUL_IP:$CONSUL_PORT" 30 \
		client_curl -f "http://$CONSUL_IP:$CONSUL_PORT/v1/status/leader"
	alive consul
	for w in "${WORKERS[@]}"; do
		ip=$(host_ip "$w")
		start "$w" "$w" worker --service "$SERVICE" --listen "0.0.0.0:$WORKER_PORT" --advertise "$ip" \
			--id "$w" --message "hello from $w" --consul-addr "$CONSUL_IP:$CONSUL_PORT" \
			--check-interval 1s --drain-delay 1s
	done
	start balancer balancer balancer --listen "0.0.0.0:$LB_PORT" --admin "0.0.0.0:$ADMIN_PORT" \
		--service "$SERVICE" --consul-addr "$CONSUL_IP:$CONSUL_PORT" --connect-timeout 1s \
		--first-byte-timeout 1s
	wait_for "the balancer's admin listener on $BALANCER_IP:$ADMIN_PORT" 30 \
		client_curl -f "http://$BALANCER_IP:$ADMIN_PORT/health"
	for w in "${WORKERS[@]}" balancer; do alive "$w"; done
	wait_for "all three workers healthy in the balancer's rotation" 30 \
		rotation_is "worker1 worker2 worker3"
}

# ---------------------------------------------------------------------------------------------
# Checks (test mode).
# ---------------------------------------------------------------------------------------------
pass() {
	log "ok: $*"
}

fail() {
	log "FAIL: $*"
	FAILED=1
}

# GET / through the balancer N times from the client host; prints the answering worker per line.
requests() {
	local n=$1 i body
	for ((i = 0; i < n; i++)); do
		body=$(client_curl -f "http://$BALANCER_IP:$LB_PORT/") || {
			echo "FAILED"
			continue
		}
		echo "${body%% *}"
	done
}

# check_rotation N "w1 w2 ...": N requests must cycle strictly over exactly those workers.
check_rotation() {
	local n=$1 expect=$2 i k
	local -a seq
	local -A count=()
	mapfile -t seq < <(requests "$n")
	local got
	got=$(printf '%s\n' "${seq[@]}" | sort -u | tr '\n' ' ' | sed 's/ $//')
	if [[ $got != "$expect" ]]; then
		fail "$n requests answered by [$got], expected [$expect]; sequence: ${seq[*]}"
		return
	fi
	k=$(wc -w <<<"$expect")
	for ((i = 0; i < n; i++)); do
		count[${seq[i]}]=$((${count[${seq[i]}]:-0} + 1))
		if ((i >= k)) && [[ ${seq[i]} != "${seq[i - k]}" ]]; then
			fail "not a strict round robin over $k workers: ${seq[*]}"
			return
		fi
	done
	local summary=""
	for i in $expect; do summary+="$i=${count[$i]} "; done
	pass "$n requests from the client rotate strictly over [$expect]: $summary"
}

check_catalog() {
	local json w
	json=$(client_curl -f "http://$CONSUL_IP:$CONSUL_PORT/v1/health/service/$SERVICE?passing") || {
		fail "cannot read the health of $SERVICE from the agent"
		return
	}
	for w in "${WORKERS[@]}"; do
		if ! grep -q "\"Address\": *\"$(host_ip "$w")\"" <<<"$json"; then
			fail "the agent does not list $w at $(host_ip "$w") as passing: $json"
			return
		fi
	done
	pass "the agent lists all three workers as passing, each at its own host's address"
}

check_members() {
	local out
	if ! out=$(ip netns exec balancer "$BIN" members --http-addr "$CONSUL_IP:$CONSUL_PORT" 2>&1); then
		fail "cluster members failed from the balancer host: $out"
		return
	fi
	printf '    %s\n' "${out//$'\n'/$'\n'    }"
	if grep -Eq "^consul +$CONSUL_IP:[0-9]+ +alive" <<<"$out"; then
		pass "cluster members, run on the balancer host, lists consul at $CONSUL_IP as alive"
	else
		fail "cluster members does not list consul at $CONSUL_IP as alive"
	fi
}

# Cutting worker2's link on the bridge side is a black hole: the agent's check times out. A steady
# stream of GETs runs across the cut: requests sent to worker2 on pooled connections get no
# answer, and with --first-byte-timeout 1s (connects: --connect-timeout 1s) each goes to another
# worker after a second, instead of waiting the upstream timeout (30 s) for a 504.
check_link_cut() {
	local t0 out=$LOGDIR/cut-stream.out stop=$LOGDIR/cut-stream.stop total bad slow
	: >"$out"
	ip netns exec client bash "$SELF" __stream "http://$BALANCER_IP:$LB_PORT/" "$out" "$stop" \
		$((${EPOCHREALTIME%.*} + 60)) >"$LOGDIR/cut-stream.log" 2>&1 &
	PIDS[cutstream]=$!
	sleep 1.5
	t0=$(now_us)
	ip -n "$BRIDGE_NS" link set v-worker2 down
	log "cut worker2's link (v-worker2 down on the bridge)"
	# A black hole, not a refusal: a connect from the client times out (curl exit 28), as the
	# agent's check and the balancer's connects do.
	local rc=0
	client_curl --connect-timeout 1 -o /dev/null "http://$(host_ip worker2):$WORKER_PORT/health" 2>/dev/null || rc=$?
	if ((rc == 28)); then
		pass "worker2 is a silent black hole: a connect to it times out"
	else
		fail "a connect to worker2 with its link cut ended with curl exit $rc, expected 28 (timeout)"
	fi
	if wait_for "worker2 out of the rotation" 30 rotation_is "worker1 worker3"; then
		pass "worker2 left the rotation $((($(now_us) - t0) / 1000)) ms after its link was cut"
	else
		fail "worker2 is still in the rotation 30 s after its link was cut: $(rotation)"
	fi
	sleep 1
	touch "$stop"
	wait "${PIDS[cutstream]}" || true
	unset "PIDS[cutstream]"
	total=$(wc -l <"$out")
	bad=$(awk '$2 != "0/200"' "$out" | wc -l)
	# The first-byte timeout (1 s) plus a second of slack.
	slow=$(awk '$4 > 2000' "$out" | wc -l)
	if ((bad > 0 || slow > 0)); then
		fail "across worker2's cut link, of $total requests $bad failed and $slow took over 2 s: $(awk '$2 != "0/200" || $4 > 2000' "$out" | head -5 | tr '\n' ';')"
	elif ((total < 10)); then
		fail "only $total requests were sent across the cut; the stream was too thin to tell"
	else
		pass "$total requests across worker2's cut link: none failed, none took over 2 s (slowest $(awk '$4 > m {m = $4} END {print m + 0}' "$out") ms)"
	fi
	check_rotation 20 "worker1 worker3"
	t0=$(now_us)
	ip -n "$BRIDGE_NS" link set v-worker2 up
	log "healed worker2's link"
	if wait_for "worker2 back in the rotation" 30 rotation_is "worker1 worker2 worker3"; then
		pass "worker2 rejoined the rotation $((($(now_us) - t0) / 1000)) ms after its link was healed"
	else
		fail "worker2 is not back 30 s after its link was healed: $(rotation)"
	fi
	check_rotation 30 "worker1 worker2 worker3"
}

# SIGKILL worker3 while the client sends a steady stream of requests: none may fail.
check_kill() {
	local out=$LOGDIR/stream.out stop=$LOGDIR/stream.stop t_kill t_gone total bad after window pid
	: >"$out"
	ip netns exec client bash "$SELF" __stream "http://$BALANCER_IP:$LB_PORT/" "$out" "$stop" \
		$((${EPOCHREALTIME%.*} + 60)) >"$LOGDIR/stream.log" 2>&1 &
	PIDS[stream]=$!
	sleep 1.5
	pid=${PIDS[worker3]}
	t_kill=$(now_us)
	kill -KILL "$pid"
	wait "$pid" 2>/dev/null || true
	unset "PIDS[worker3]"
	log "SIGKILLed worker3 (pid $pid) under a steady stream of requests"
	[[ -z $(ip netns pids worker3) ]] || fail "processes remain in worker3's namespace"
	if wait_for "worker3 out of the rotation" 30 rotation_is "worker1 worker2"; then
		t_gone=$(now_us)
		pass "worker3 left the rotation $(((t_gone - t_kill) / 1000)) ms after SIGKILL"
	else
		fail "worker3 is still in the rotation 30 s after SIGKILL: $(rotation)"
	fi
	# Keep the stream going until it has shown at least 10 requests on the new rotation.
	local deadline=$(($(now_us) + 15000000))
	while (($(awk -v t="${t_gone:-0}" '$1 > t' "$out" | wc -l) < 10 && $(now_us) < deadline)); do
		sleep 0.2
	done
	touch "$stop"
	wait "${PIDS[stream]}" || true
	unset "PIDS[stream]"
	total=$(wc -l <"$out")
	bad=$(awk '$2 != "0/200"' "$out" | wc -l)
	after=$(awk -v t="$t_kill" '$1 > t' "$out" | wc -l)
	# Requests sent while worker3 was dead but still in the rotation: the balancer had to retry.
	window=$(awk -v a="$t_kill" -v b="${t_gone:-0}" '$1 > a && $1 <= b' "$out" | wc -l)
	local who
	who=$(awk '{print $3}' "$out" | sort | uniq -c | awk '{printf "%s%s=%s", sep, $2, $1; sep = " "}')
	if ((bad > 0)); then
		fail "$bad of $total requests failed around worker3's SIGKILL: $(awk '$2 != "0/200"' "$out" | head -5 | tr '\n' ';')"
	elif ((after < 10)); then
		fail "only $after requests were sent after the SIGKILL; the stream was too thin to tell"
	else
		pass "$total requests (stream: $who; $after after the SIGKILL, $window while worker3 was dead but still in the rotation), zero failed"
	fi
	check_rotation 20 "worker1 worker2"
}

run_tests() {
	check_rotation 30 "worker1 worker2 worker3"
	check_catalog
	check_members
	check_link_cut
	check_kill
	if ((FAILED)); then
		log "some checks failed"
		exit 1
	fi
	log "all checks passed"
}

print_howto() {
	local outer=${NETNS_CLUSTER_UNSHARE_PID:-UNSHARE_PID}
	cat <<EOF

The cluster runs in a sandbox (user, network, mount and pid namespaces) with no route off this
machine. Hosts: consul $CONSUL_IP, balancer $BALANCER_IP, worker1..3 ${SUBNET_PREFIX}.21-23, client $CLIENT_IP.

From another terminal, enter the sandbox (as the same user):

    nsenter --preserve-credentials -U -m -n -t "\$(pgrep -P $outer)"

then talk to the hosts from the client host:

    for i in \$(seq 6); do ip netns exec client curl -s http://$BALANCER_IP:$LB_PORT/; done
    ip netns exec client curl -s http://$BALANCER_IP:$ADMIN_PORT/status
    ip netns exec client $BIN members --http-addr $CONSUL_IP:$CONSUL_PORT
    ip -n $BRIDGE_NS link set v-worker2 down     # cut worker2's link; 'up' heals it

Logs: $LOGDIR/*.log inside the sandbox. Ctrl-C stops everything.
EOF
}

build_topology
start_cluster
case $MODE in
test)
	run_tests
	;;
up)
	requests 6 | sed 's/^/    client -> balancer -> /'
	print_howto
	ON_STOP_STATUS=0
	while true; do
		sleep 1 &
		wait $! || true
	done
	;;
esac
