#!/usr/bin/env bash
# Writes one VM's configuration: the Consul agent's /etc/consul.d/consul.hcl and, by role,
# /etc/default/worker or /etc/default/balancer (the units' EnvironmentFile). Prints the path of
# each file whose content changed, so the caller restarts only what it must.
#
#   render-config.sh [PREFIX]      PREFIX (default: none) is prepended to every path (CI uses it)
#
# Input, from the Vagrantfile through provision.sh:
#   NODE_ROLE          server | balancer | worker
#   NODE_NAME          Consul node name (= the VM's host name)
#   NODE_IP            the VM's private-network address: Consul binds and advertises on it
#   CONSUL_SERVER_IPS  the servers' addresses, comma- or space-separated (retry_join)
#   WORKER_MESSAGE     (worker, optional) text of GET /, default "hello from NODE_NAME"
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$deploy/lib.sh"

prefix=${1:-}
role=${NODE_ROLE:?NODE_ROLE must be server, balancer or worker}
name=${NODE_NAME:?NODE_NAME is required}
ip=${NODE_IP:?NODE_IP is required}
read -r -a servers <<<"${CONSUL_SERVER_IPS//,/ }"

ipv4='^([0-9]{1,3}\.){3}[0-9]{1,3}$'
[[ "$ip" =~ $ipv4 ]] || die "NODE_IP=$ip is not an IPv4 address"
((${#servers[@]})) || die "CONSUL_SERVER_IPS is empty"
for s in "${servers[@]}"; do
  [[ "$s" =~ $ipv4 ]] || die "CONSUL_SERVER_IPS: $s is not an IPv4 address"
done
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] || die "NODE_NAME=$name is not a valid node name"
case "$role" in server | balancer | worker) ;; *) die "NODE_ROLE=$role: expected server, balancer or worker" ;; esac

# Writes $2 to $prefix$1 (mode $3) unless it already holds exactly that; prints the path if changed.
put() {
  local path=$prefix$1 text=$2 mode=$3
  if [[ -f "$path" ]] && [[ "$(cat "$path")" == "$text" ]]; then
    return 0
  fi
  mkdir -p "$(dirname "$path")"
  publish_text "$path" "$text"
  chmod "$mode" "$path"
  printf '%s\n' "$1"
}

# An HCL list of quoted strings.
hcl_list() {
  local out="" x
  for x in "$@"; do out+="${out:+, }\"$x\""; done
  printf '[%s]' "$out"
}

header="# Written by deploy/render-config.sh at provisioning; local edits are overwritten."

# A server joins the other servers; a client joins all of them.
join=()
for s in "${servers[@]}"; do
  [[ "$s" == "$ip" ]] || join+=("$s")
done

if [[ "$role" == server ]]; then
  client_addr="127.0.0.1 $ip"
  client_note=", and the UI and API for the host"
  role_hcl="
# A server of ${#servers[@]}; the cluster elects a leader once that many have joined.
server           = true
bootstrap_expect = ${#servers[@]}

# The web UI, at http://$ip:8500/ui from the host.
ui_config {
  enabled = true
}"
else
  client_addr="127.0.0.1"
  client_note=""
  role_hcl="
# A client leaves the cluster when stopped (vagrant halt), so it shows as \"left\", not \"failed\".
server             = false
leave_on_terminate = true"
fi

join_hcl=""
if ((${#join[@]})); then
  join_hcl="
retry_join = $(hcl_list "${join[@]}")"
fi

consul_hcl="$header
datacenter           = \"dc1\"
node_name            = \"$name\"
data_dir             = \"/opt/consul\"
log_level            = \"INFO\"
disable_update_check = true

# A VM has two networks: the provider's NAT (10.0.2.15 on every VirtualBox VM) and the private
# network. Consul must not pick one itself: bind and advertise on the private network's address,
# which the Vagrantfile passes in.
bind_addr      = \"$ip\"
advertise_addr = \"$ip\"

# HTTP API and DNS for the tools on this VM (consul CLI, worker, balancer)$client_note.
client_addr = \"$client_addr\"$join_hcl
$role_hcl"

put /etc/consul.d/consul.hcl "$consul_hcl" 0644

# systemd's EnvironmentFile: double quotes, with \ and " escaped.
quote() {
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

case "$role" in
  worker)
    put /etc/default/worker "$header
# worker.service reads this; every flag of \`worker --help\` has a WORKER_* variable.
WORKER_SERVICE=web
WORKER_LISTEN=0.0.0.0:9001
WORKER_ADVERTISE=$ip
WORKER_ID=$name
WORKER_MESSAGE=$(quote "${WORKER_MESSAGE:-hello from $name}")
# The health switch (PUT /admin/health), on its own loopback port, never on the service port:
# curl -X PUT -d fail http://127.0.0.1:10001/admin/health on this VM takes it out of rotation.
WORKER_ADMIN=127.0.0.1:10001
# Leave Consul, wait for the balancers to notice, then drain (TimeoutStopSec allows for both).
WORKER_DRAIN_DELAY=2s
WORKER_SHUTDOWN_GRACE=10s
# The local Consul client agent, like every Consul tool.
CONSUL_HTTP_ADDR=127.0.0.1:8500
RUST_LOG=info" 0644
    ;;
  balancer)
    put /etc/default/balancer "$header
# balancer.service reads this; see \`balancer --help\`.
# 0.0.0.0, not $ip: Vagrant's forwarded ports arrive on the NAT interface.
BALANCER_LISTEN=0.0.0.0:8080
BALANCER_ADMIN=0.0.0.0:8081
BALANCER_SERVICES=web
# The local Consul client agent, like every Consul tool.
CONSUL_HTTP_ADDR=127.0.0.1:8500
RUST_LOG=info" 0644
    ;;
esac
