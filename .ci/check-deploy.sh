#!/usr/bin/env bash
# Checks the Vagrant demo (Vagrantfile, deploy/) as far as a machine that cannot boot VMs can:
#   1. ruby -c on the Vagrantfile;
#   2. vagrant validate --ignore-provider for the default and the larger topologies, offline, and
#      that bad settings are refused;
#   3. shellcheck on every *.sh in deploy/ and .ci/;
#   4. deploy/render-config.sh for each role: the files it writes, and that a second run changes
#      nothing;
#   5. systemd unit syntax (our units and our drop-in for consul.service) with
#      systemd-analyze verify, when it is available.
# Installs vagrant, ruby and shellcheck with apt-get when missing (CI: root on Debian 12).
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
  printf 'check-deploy: FAIL: %s\n' "$*" >&2
  exit 1
}

echo "== install: vagrant, ruby, shellcheck (only if missing)"
missing=()
for tool in vagrant ruby shellcheck; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  # Another apt-get may hold the dpkg lock for a while on a shared machine: wait for it.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}"
fi
vagrant --version
ruby --version
shellcheck --version | sed -n 2p

echo "== ruby -c Vagrantfile"
ruby -c Vagrantfile

echo "== vagrant validate --ignore-provider"
# A private VAGRANT_HOME and dotfile path: nothing is written to the repository or to ~/.vagrant.d.
# Vagrant's version check and box update check are off, and when this user may create a
# network namespace, validate runs in one with no network at all, which proves that it needs
# none (it never downloads the box). It does not run the trigger, so nothing is built.
export VAGRANT_HOME="$tmp/vagrant-home" VAGRANT_DOTFILE_PATH="$tmp/vagrant-dotfile"
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_BOX_UPDATE_CHECK_DISABLE=1 VAGRANT_NO_COLOR=1
offline=()
if unshare --net true 2>/dev/null; then
  offline=(unshare --net)
else
  echo "(cannot create a network namespace here: validating with the network available)"
fi
# $@: VAR=value settings for the Vagrantfile. The settings it reads are cleared first, so the
# caller's environment does not change what is checked.
validate() {
  env -u CONSUL_SERVERS -u WORKERS -u VM_MEMORY -u VM_CPUS -u BOX -u LIBVIRT_SYNC \
    -u CONSUL_VERSION -u BUILD_IN_VM "$@" "${offline[@]}" vagrant validate --ignore-provider
}
validate >"$tmp/validate.out" 2>&1 || {
  cat "$tmp/validate.out"
  fail "vagrant validate (default topology)"
}
cat "$tmp/validate.out"
for vm in consul balancer worker1 worker2 worker3; do
  grep -q "^==> $vm:" "$tmp/validate.out" || fail "the default topology has no VM $vm"
done
[[ "$(grep -c '^==> ' "$tmp/validate.out")" == 5 ]] || fail "the default topology is not five VMs"

validate CONSUL_SERVERS=3 WORKERS=5 LIBVIRT_SYNC=rsync >"$tmp/validate3.out" 2>&1 || {
  cat "$tmp/validate3.out"
  fail "vagrant validate with CONSUL_SERVERS=3 WORKERS=5"
}
for vm in consul1 consul2 consul3 balancer worker1 worker5; do
  grep -q "^==> $vm:" "$tmp/validate3.out" || fail "CONSUL_SERVERS=3 WORKERS=5 has no VM $vm"
done
echo "CONSUL_SERVERS=3 WORKERS=5: $(grep -c '^==> ' "$tmp/validate3.out") VMs validated"

for bad in CONSUL_SERVERS=2 WORKERS=0 WORKERS=x LIBVIRT_SYNC=smb; do
  if validate "$bad" >"$tmp/bad.out" 2>&1; then
    fail "vagrant validate accepted $bad"
  fi
  grep -q "${bad%%=*}" "$tmp/bad.out" || {
    cat "$tmp/bad.out"
    fail "the error for $bad does not name ${bad%%=*}"
  }
done
echo "bad settings are refused with a message naming them"
[[ ! -e .vagrant ]] || echo "(note: a .vagrant/ directory exists; it was not created by this check)"

echo "== shellcheck deploy/ .ci/"
mapfile -t scripts < <(find deploy .ci -name bin -prune -o -type f -name '*.sh' -print | LC_ALL=C sort)
((${#scripts[@]})) || fail "no scripts found"
printf '  %s\n' "${scripts[@]}"
shellcheck -x "${scripts[@]}"

echo "== deploy/render-config.sh"
# Renders each role's files under a scratch prefix, as provisioning does under /.
render() {
  local prefix=$1
  shift
  env -u WORKER_MESSAGE "$@" deploy/render-config.sh "$tmp/$prefix"
}
# $1: file, then the exact lines it must contain.
expect_lines() {
  local file=$1 line
  shift
  [[ -f "$file" ]] || fail "$file was not written"
  for line in "$@"; do
    grep -qxF -- "$line" "$file" || fail "$file lacks the line: $line"
  done
}
servers3=192.168.56.10,192.168.56.12,192.168.56.13

render server1 NODE_ROLE=server NODE_NAME=consul NODE_IP=192.168.56.10 \
  CONSUL_SERVER_IPS=192.168.56.10 >/dev/null
expect_lines "$tmp/server1/etc/consul.d/consul.hcl" 'datacenter           = "dc1"' \
  'node_name            = "consul"' 'bind_addr      = "192.168.56.10"' \
  'advertise_addr = "192.168.56.10"' 'client_addr = "127.0.0.1 192.168.56.10"' \
  'server           = true' 'bootstrap_expect = 1' '  enabled = true'
! grep -q retry_join "$tmp/server1/etc/consul.d/consul.hcl" || fail "a lone server must not retry_join"

render server3 NODE_ROLE=server NODE_NAME=consul2 NODE_IP=192.168.56.12 \
  CONSUL_SERVER_IPS="$servers3" >/dev/null
expect_lines "$tmp/server3/etc/consul.d/consul.hcl" 'bootstrap_expect = 3' \
  'retry_join = ["192.168.56.10", "192.168.56.13"]'

render worker NODE_ROLE=worker NODE_NAME=worker2 NODE_IP=192.168.56.22 \
  CONSUL_SERVER_IPS="$servers3" >"$tmp/changed"
expect_lines "$tmp/changed" /etc/consul.d/consul.hcl /etc/default/worker
expect_lines "$tmp/worker/etc/consul.d/consul.hcl" 'client_addr = "127.0.0.1"' \
  'retry_join = ["192.168.56.10", "192.168.56.12", "192.168.56.13"]' 'leave_on_terminate = true'
expect_lines "$tmp/worker/etc/default/worker" WORKER_SERVICE=web WORKER_LISTEN=0.0.0.0:9001 \
  WORKER_ADVERTISE=192.168.56.22 WORKER_ID=worker2 'WORKER_MESSAGE="hello from worker2"' \
  CONSUL_HTTP_ADDR=127.0.0.1:8500
render worker NODE_ROLE=worker NODE_NAME=worker2 NODE_IP=192.168.56.22 \
  CONSUL_SERVER_IPS="$servers3" >"$tmp/changed"
[[ ! -s "$tmp/changed" ]] || fail "a second render changed: $(cat "$tmp/changed")"

render balancer NODE_ROLE=balancer NODE_NAME=balancer NODE_IP=192.168.56.11 \
  CONSUL_SERVER_IPS=192.168.56.10 >/dev/null
expect_lines "$tmp/balancer/etc/default/balancer" BALANCER_LISTEN=0.0.0.0:8080 \
  BALANCER_ADMIN=0.0.0.0:8081 BALANCER_SERVICES=web CONSUL_HTTP_ADDR=127.0.0.1:8500

# Braces and quotes balance in every rendered HCL file (there is no HCL parser here; Consul
# itself runs `consul validate` on the VM before starting).
for hcl in "$tmp"/*/etc/consul.d/consul.hcl; do
  body=$(grep -v '^[[:space:]]*#' "$hcl")
  opens=${body//[^\{]/} closes=${body//[^\}]/} quotes=${body//[^\"]/}
  ((${#opens} == ${#closes})) || fail "$hcl: unbalanced braces"
  ((${#quotes} % 2 == 0)) || fail "$hcl: unbalanced quotes"
done
if NODE_ROLE=worker NODE_NAME=w NODE_IP=not-an-ip CONSUL_SERVER_IPS=192.168.56.10 \
  deploy/render-config.sh "$tmp/bad" >/dev/null 2>&1; then
  fail "render-config.sh accepted NODE_IP=not-an-ip"
fi
echo "server, worker and balancer files rendered as expected; a second run changes nothing"

echo "== systemd-analyze verify deploy/systemd/"
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify fails on an ExecStart= that is not an executable file, and /usr/local/bin/worker
  # only exists on the VMs. So it checks copies of the units whose /usr/local/bin/ paths point at
  # stub executables; nothing else in them changes. Our consul.service drop-in is checked on top
  # of a stand-in for the consul package's unit (its text, ExecStart= pointing at a stub), found
  # through SYSTEMD_UNIT_PATH like the real one. verify only warns (exit 0) about unknown keys
  # and bad values, so any output at all is a failure. EnvironmentFile= is read when a unit
  # starts, not by verify.
  units_dir="$tmp/units"
  mkdir -p "$units_dir/bin"
  stub() {
    printf '#!/bin/sh\nexit 0\n' >"$units_dir/bin/$1"
    chmod 0755 "$units_dir/bin/$1"
  }
  units=()
  for unit in deploy/systemd/*.service; do
    while IFS= read -r exe; do
      stub "${exe##*/}"
    done < <(sed -n 's|^Exec[A-Za-z]*=[-@:+!]*\(/usr/local/bin/[^ ]*\).*|\1|p' "$unit")
    sed "s|/usr/local/bin/|$units_dir/bin/|g" "$unit" >"$units_dir/${unit##*/}"
    units+=("$units_dir/${unit##*/}")
  done
  ((${#units[@]})) || fail "no units in deploy/systemd/"
  for dropins in deploy/systemd/*.service.d; do
    if [[ -d "$dropins" ]]; then
      cp -r "$dropins" "$units_dir/"
    fi
  done
  # The consul package's unit (hashicorp/consul, .release/linux/package/usr/lib/systemd/system).
  stub consul
  cat >"$units_dir/consul.service" <<EOF
[Unit]
Description="HashiCorp Consul - A service mesh solution"
Documentation=https://www.consul.io/
Requires=network-online.target
After=network-online.target
ConditionDirectoryNotEmpty=/etc/consul.d

[Service]
Type=notify
EnvironmentFile=-/etc/consul.d/consul.env
User=consul
Group=consul
ExecStart=$units_dir/bin/consul agent -config-dir=/etc/consul.d/
ExecReload=/bin/kill --signal HUP \$MAINPID
KillMode=process
KillSignal=SIGTERM
Restart=on-failure
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
EOF
  units+=("$units_dir/consul.service")
  if ! SYSTEMD_UNIT_PATH="$units_dir:" systemd-analyze verify "${units[@]}" >"$tmp/verify.out" 2>&1 \
    || [[ -s "$tmp/verify.out" ]]; then
    sed "s|$units_dir/|deploy/systemd/|g" "$tmp/verify.out" >&2
    fail "systemd-analyze verify"
  fi
  for unit in "${units[@]##*/}"; do
    if [[ "$unit" == consul.service ]]; then
      echo "  consul.service: ok (the stand-in for the package's unit)"
    else
      echo "  $unit: ok"
    fi
  done
  find "$units_dir" -path '*.service.d/*' -type f -printf '  %P: ok (drop-in)\n'
else
  echo "(systemd-analyze not available: unit syntax not checked)"
fi

echo "== check-deploy: ok"
