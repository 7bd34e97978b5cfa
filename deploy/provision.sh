#!/usr/bin/env bash
# Provisions one VM; the Vagrantfile runs it as root on every VM, with this environment:
#   NODE_ROLE          server | balancer | worker
#   NODE_NAME          the VM's name, used as the Consul node name
#   NODE_IP            the VM's private-network address (Consul binds and advertises on it)
#   CONSUL_SERVER_IPS  the Consul servers' addresses, comma-separated
#   CONSUL_VERSION     (optional) pins the consul package, e.g. 1.20.2-1
#
# Steps: Consul from HashiCorp's apt repository, its configuration, our three binaries in
# /usr/local/bin, and by role the worker or balancer unit. Idempotent: running it again changes
# nothing, and restarts a service only when its binary, unit or configuration changed (for
# Consul: when the package replaced the binary the agent runs).
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$deploy/lib.sh"

role=${NODE_ROLE:?NODE_ROLE must be server, balancer or worker}
name=${NODE_NAME:?NODE_NAME is required}
ip=${NODE_IP:?NODE_IP is required}
[[ $EUID -eq 0 ]] || die "run as root (the Vagrantfile does)"

# The address comes from the Vagrantfile; make sure the private network really carries it
# rather than guessing an interface name.
if ! ip -o -4 addr show | awk '{print $4}' | cut -d/ -f1 | grep -qxF "$ip"; then
  die "no interface has $ip; is the private network up? ($(hostname -I))"
fi

log "provision: $name ($role) at $ip; Consul servers ${CONSUL_SERVER_IPS:?}"

"$deploy/install-consul.sh"

changed_config=$("$deploy/render-config.sh")
changed_bins=$("$deploy/install-binaries.sh")

# Consul: the package's unit, with our drop-in (Type=exec; see the file), on a configuration
# checked before Consul (re)starts on it.
restart_consul=0
dropin=/etc/systemd/system/consul.service.d/type-exec.conf
if ! cmp -s "$deploy/systemd/consul.service.d/type-exec.conf" "$dropin"; then
  install -D -m 0644 "$deploy/systemd/consul.service.d/type-exec.conf" "$dropin"
  systemctl daemon-reload
  restart_consul=1
fi
if grep -qxF /etc/consul.d/consul.hcl <<<"$changed_config"; then
  restart_consul=1
fi
# A new consul package (another CONSUL_VERSION, or an upgrade) replaces the binary, but its
# postinstall only reloads systemd: the agent keeps running the old version until restarted.
consul_pid=$(systemctl show -p MainPID --value consul 2>/dev/null || echo 0)
if [[ "$consul_pid" =~ ^[1-9][0-9]*$ ]] && exe_replaced "$consul_pid"; then
  log "provision: the consul package changed under the running agent"
  restart_consul=1
fi
consul validate /etc/consul.d >/dev/null
systemctl enable --quiet consul
if ((restart_consul)) || ! systemctl is-active --quiet consul; then
  log "provision: (re)starting consul"
  systemctl restart consul
fi

# $1: worker or balancer. Installs the unit, then starts it, or restarts it when anything it
# runs on changed.
run_unit() {
  local unit=$1 changed=0
  if ! cmp -s "$deploy/systemd/$unit.service" "/etc/systemd/system/$unit.service"; then
    install -m 0644 "$deploy/systemd/$unit.service" "/etc/systemd/system/$unit.service"
    systemctl daemon-reload
    changed=1
  fi
  if grep -qxF "/etc/default/$unit" <<<"$changed_config" \
    || grep -qxF "/usr/local/bin/$unit" <<<"$changed_bins"; then
    changed=1
  fi
  systemctl enable --quiet "$unit"
  if ((changed)) || ! systemctl is-active --quiet "$unit"; then
    log "provision: (re)starting $unit"
    systemctl restart "$unit"
  fi
}

# $1: URL; waits up to 60 s for any HTTP answer.
wait_http() {
  for _ in $(seq 60); do
    if curl -s -o /dev/null --max-time 2 "$1"; then
      return 0
    fi
    sleep 1
  done
  return 1
}

case "$role" in
  worker)
    run_unit worker
    wait_http "http://$ip:9001/health" || die "worker does not answer on $ip:9001 (journalctl -u worker)"
    ;;
  balancer)
    run_unit balancer
    wait_http "http://127.0.0.1:8081/health" || die "balancer admin does not answer (journalctl -u balancer)"
    ;;
  server) ;;
  *) die "NODE_ROLE=$role: expected server, balancer or worker" ;;
esac

# The cluster as this agent sees it (servers provisioned later are not in it yet).
for _ in $(seq 30); do
  if consul members >/dev/null 2>&1; then
    break
  fi
  sleep 1
done
consul members || log "provision: consul members failed; see journalctl -u consul"
log "provision: $name done"
