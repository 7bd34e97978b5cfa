#!/usr/bin/env bash
# RPS, P99 and EFF are read through a name reference (`rounds`), which shellcheck cannot follow.
# shellcheck disable=SC2034
# One core for the proxy, the other for everything else: the load generator (wrk) and three
# nginx backends are pinned to CPU 0, and each proxy in turn (nginx with one worker, HAProxy with
# one thread, the balancer with one event loop) to CPU 1. On a 2-core machine this is the closest
# to a dedicated front-door core: what one core of the proxy does, undisturbed by the load
# generator, in requests per second and per CPU-second. It says nothing about scaling across
# cores; the README states what is projected from it.
#
#   bash bench/pinned.sh [BALANCER_BIN]      (default target/release/balancer; needs root to
#                                             install nginx, haproxy, wrk, curl if missing)
#
# Environment: ROUNDS (3), DURATION (10, seconds per run), CONNS (64), PORT_BASE (19400).
# Everything listens on 127.0.0.1 only. Prints one table to stdout; progress goes to stderr.
set -euo pipefail

BIN=${1:-target/release/balancer}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
PORT_BASE=${PORT_BASE:-19400}
LOAD_CPU=0
PROXY_CPU=1

log() { printf '%s\n' "$*" >&2; }
die() {
	log "pinned: $*"
	exit 1
}

[[ -x $BIN ]] || die "no balancer binary at $BIN (cargo build --release -p balancer)"
(($(nproc) >= 2)) || die "needs at least 2 CPUs"
need=()
for t in nginx haproxy wrk curl; do command -v "$t" >/dev/null || need+=("$t"); done
if ((${#need[@]})); then
	((EUID == 0)) || die "missing ${need[*]}: install them, or run as root"
	log "installing ${need[*]}"
	made=0
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		# Keep Debian from starting system-wide nginx or haproxy services.
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		made=1
	fi
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >&2
	((made)) && rm -f /usr/sbin/policy-rc.d
fi

W=$(mktemp -d /tmp/pinned.XXXXXX)
chmod 755 "$W"
declare -a STARTED=()
declare -A PIDS=()
cleanup() {
	local p
	for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	sleep 0.3
	for p in "${STARTED[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	rm -rf "$W"
}
trap cleanup EXIT

B1=$PORT_BASE B2=$((PORT_BASE + 1)) B3=$((PORT_BASE + 2))
P_NGINX=$((PORT_BASE + 10)) P_HAP=$((PORT_BASE + 11)) P_LB=$((PORT_BASE + 12)) P_ADMIN=$((PORT_BASE + 13))

nginx_head() { # name workers
	cat <<EOF
worker_processes $2;
pid $W/$1.pid;
error_log $W/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  client_body_temp_path $W/$1-body;
  proxy_temp_path $W/$1-proxy;
  default_type text/plain;
EOF
}
{
	nginx_head backends 1
	for i in 1 2 3; do
		echo "  server { listen 127.0.0.1:$((PORT_BASE + i - 1)) backlog=4096; return 200 \"worker-$i\\n\"; }"
	done
	echo "}"
} >"$W/backends.conf"
{
	nginx_head proxy 1
	cat <<EOF
  upstream web { server 127.0.0.1:$B1; server 127.0.0.1:$B2; server 127.0.0.1:$B3; keepalive 256; keepalive_timeout 600s; }
  server {
    listen 127.0.0.1:$P_NGINX backlog=4096;
    location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
} >"$W/proxy.conf"
cat >"$W/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAP
  default_backend be
backend be
  balance roundrobin
  server s1 127.0.0.1:$B1
  server s2 127.0.0.1:$B2
  server s3 127.0.0.1:$B3
EOF

# start CPU NAME CMD...: runs CMD pinned to CPU in the background.
start() {
	local cpu=$1 name=$2
	shift 2
	taskset -c "$cpu" "$@" >"$W/$name.log" 2>&1 &
	STARTED+=($!)
	PIDS[$name]=$!
}

wait_200() {
	local url=$1 i
	for i in $(seq 100); do
		[[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]] && return 0
		sleep 0.1
	done
	die "$url never answered 200"
}

start $LOAD_CPU backends nginx -g 'daemon off;' -c "$W/backends.conf"
wait_200 "http://127.0.0.1:$B1/"
start $PROXY_CPU nginx nginx -g 'daemon off;' -c "$W/proxy.conf"
start $PROXY_CPU haproxy haproxy -f "$W/haproxy.cfg"
# The balancer with its instances given statically through a dev agent would add a process on
# the proxy core; a --service route to the dev agent is what a user runs, so run one agent on
# the load core.
AGENT=${BIN%/balancer}/discovery
[[ -x $AGENT ]] || die "no dev agent binary at $AGENT"
start $LOAD_CPU agent "$AGENT" agent --dev --http-addr "127.0.0.1:$((PORT_BASE + 20))"
wait_200 "http://127.0.0.1:$((PORT_BASE + 20))/v1/status/leader"
for i in 1 2 3; do
	curl -sf -X PUT --data "{\"ID\":\"pinned-$i\",\"Name\":\"web\",\"Address\":\"127.0.0.1\",\"Port\":$((PORT_BASE + i - 1))}" \
		"http://127.0.0.1:$((PORT_BASE + 20))/v1/agent/service/register" >/dev/null
done
start $PROXY_CPU lb "$BIN" --listen "127.0.0.1:$P_LB" --admin "127.0.0.1:$P_ADMIN" --service web \
	--threads 1 --pool-idle-timeout 600s --consul-addr "127.0.0.1:$((PORT_BASE + 20))"
for p in $P_NGINX $P_HAP $P_LB; do wait_200 "http://127.0.0.1:$p/"; done

# CPU ticks (user + system) of a process and its children (threads are counted in the
# process's own figures).
ticks() {
	local pid=$1 total=0 p s
	local -a f
	for p in $pid $(pgrep -P "$pid" || true); do
		s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
		read -r -a f <<<"${s##*) }"
		total=$((total + f[11] + f[12]))
	done
	echo "$total"
}

# Filled by `run`, read through the `rounds` name reference.
declare -A RPS P99 EFF
run() { # name port pid round
	local name=$1 port=$2 pid=$3 round=$4 t0 t1 out rps p99 cpu
	t0=$(ticks "$pid")
	out=$(taskset -c $LOAD_CPU wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/" 2>&1)
	t1=$(ticks "$pid")
	rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
	# wrk prints 950.00us, 1.23ms or 1.02s: in milliseconds.
	p99=$(awk '$1 == "99%" {v = $2 + 0; if ($2 ~ /us$/) v /= 1000; else if ($2 ~ /[0-9]s$/) v *= 1000; printf "%.2f", v}' <<<"$out")
	cpu=$(awk -v d=$((t1 - t0)) 'BEGIN {printf "%.2f", d / 100}')
	grep -q 'Non-2xx\|Socket errors' <<<"$out" && log "$name round $round: errors: $(grep -E 'Non-2xx|Socket errors' <<<"$out")"
	RPS[$name,$round]=$rps
	P99[$name,$round]=$p99
	EFF[$name,$round]=$(awk -v r="$rps" -v d="$DURATION" -v c="$cpu" 'BEGIN {if (c > 0) printf "%.0f", r * d / c; else print 0}')
	log "$name round $round: $rps req/s, p99 $p99 ms, $cpu CPU-s, ${EFF[$name,$round]} req per CPU-second"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
# The values of array NAME for metric KEY over the rounds, one per line.
rounds() {
	local -n arr=$1
	local r
	for ((r = 1; r <= ROUNDS; r++)); do echo "${arr[$2,$r]}"; done
}

for ((r = 1; r <= ROUNDS; r++)); do
	run nginx $P_NGINX "${PIDS[nginx]}" $r
	sleep 1
	run haproxy $P_HAP "${PIDS[haproxy]}" $r
	sleep 1
	run balancer $P_LB "${PIDS[lb]}" $r
	sleep 1
done

printf '| proxy (pinned to CPU %s) | req/s (median) | p99 ms (median) | req per CPU-second (median) | × nginx (req/CPU-s) |\n|---|---|---|---|---|\n' $PROXY_CPU
mapfile -t v < <(rounds EFF nginx)
base=$(median "${v[@]}")
for name in nginx haproxy balancer; do
	mapfile -t v < <(rounds RPS "$name")
	rps=$(median "${v[@]}")
	mapfile -t v < <(rounds P99 "$name")
	p99=$(median "${v[@]}")
	mapfile -t v < <(rounds EFF "$name")
	eff=$(median "${v[@]}")
	printf '| %s | %s | %s | %s | %s |\n' "$name" "$rps" "$p99" "$eff" "$(awk -v a="$eff" -v b="$base" 'BEGIN {if (b > 0) printf "%.2f", a / b}')"
done
