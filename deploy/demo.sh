#!/usr/bin/env bash
# The Vagrant demo's steps, run from the host after `vagrant up` (deploy/README.md):
#
#   deploy/demo.sh                 rotate, members, services, status, then one worker (worker2,
#                                  or worker1 when WORKERS=1) stops and starts again
#   deploy/demo.sh rotate [N]      N requests (default 6) through the balancer
#   deploy/demo.sh members         `consul members` on the Consul server
#   deploy/demo.sh services        the nodes where "web" is registered, as Consul sees them
#   deploy/demo.sh stop WORKER     stop the worker service on a VM (it leaves Consul, then drains)
#   deploy/demo.sh start WORKER    start it again
#   deploy/demo.sh halt WORKER     `vagrant halt` the whole VM; `deploy/demo.sh up WORKER` to return
#   deploy/demo.sh status          the balancer's status page
#   deploy/demo.sh -n [STEP]       print the commands of STEP (default: all of them), run nothing
#
# BALANCER_URL / ADMIN_URL default to the ports Vagrant forwards (127.0.0.1:8080 and :8081);
# http://192.168.56.11:8080 and :8081 reach the balancer VM directly. Use the same
# CONSUL_SERVERS and WORKERS settings as for `vagrant up`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

dry=0
if [[ "${1:-}" == -n ]]; then
  dry=1
  shift
fi

balancer_url=${BALANCER_URL:-http://127.0.0.1:8080}
admin_url=${ADMIN_URL:-http://127.0.0.1:8081}
if [[ "${CONSUL_SERVERS:-1}" == 1 ]]; then server=consul; else server=consul1; fi
workers=${WORKERS:-3}
if ! [[ "$workers" =~ ^[0-9]+$ ]] || ((workers < 1 || workers > 50)); then
  echo "WORKERS=$workers: expected a number from 1 to 50, as for vagrant up" >&2
  exit 64
fi
# The worker that leaves and comes back in the full demo.
if ((workers >= 2)); then leaver=worker2; else leaver=worker1; fi

# Runs its arguments, except with -n.
run() { ((dry)) || "$@"; }

step() {
  if [[ -t 1 ]]; then
    printf '\n\033[1m$ %s\033[0m\n' "$*"
  else
    printf '\n$ %s\n' "$*"
  fi
}

rotate() {
  local n=${1:-6}
  step "for i in \$(seq $n); do curl -s $balancer_url/; done"
  for _ in $(seq "$n"); do
    run curl -sS --max-time 5 "$balancer_url/" || true
  done
}

members() {
  step "vagrant ssh $server -c 'consul members'"
  run vagrant ssh "$server" -c 'consul members'
}

services() {
  step "vagrant ssh $server -c 'consul catalog nodes -service=web'"
  run vagrant ssh "$server" -c 'consul catalog nodes -service=web'
}

status() {
  step "curl -s $admin_url/status"
  run curl -sS --max-time 5 "$admin_url/status"
  ((dry)) || echo
}

# Waits up to 30 s until the balancer's answers include (want=1) or exclude (want=0) $1.
wait_rotation() {
  local name=$1 want=$2 seen
  ((dry)) && return 0
  for _ in $(seq 30); do
    seen=0
    for _ in $(seq 6); do
      if curl -s --max-time 2 "$balancer_url/" | grep -q "^$name "; then seen=1; fi
    done
    ((seen == want)) && return 0
    sleep 1
  done
  echo "(after 30 s $name is $( ((want)) && echo 'still not' || echo 'still') in the rotation)" >&2
}

worker_arg() {
  [[ "${1:-}" =~ ^worker[0-9]+$ ]] || {
    echo "usage: $0 ${2} workerN" >&2
    exit 64
  }
}

# $1: stop, start, halt or up; $2: the worker. Then waits until the rotation shows it.
worker_step() {
  local action=$1 name=$2
  worker_arg "$name" "$action"
  case "$action" in
    stop | start)
      step "vagrant ssh $name -c 'sudo systemctl $action worker'"
      run vagrant ssh "$name" -c "sudo systemctl $action worker"
      ;;
    halt | up)
      step "vagrant $action $name"
      run vagrant "$action" "$name"
      ;;
  esac
  case "$action" in
    stop | halt) wait_rotation "$name" 0 ;;
    *) wait_rotation "$name" 1 ;;
  esac
}

case "${1:-all}" in
  rotate) rotate "${2:-6}" ;;
  members) members ;;
  services) services ;;
  status) status ;;
  stop | start | halt | up) worker_step "$1" "${2:-}" ;;
  all)
    rotate 6
    members
    services
    status
    step "# $leaver leaves: systemd stops it, it deregisters, drains and exits"
    worker_step stop "$leaver"
    rotate 6
    services
    step "# $leaver comes back"
    worker_step start "$leaver"
    rotate 6
    ;;
  help | -h | --help) usage ;;
  *)
    usage >&2
    exit 64
    ;;
esac
