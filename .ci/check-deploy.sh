#!/usr/bin/env bash
# Checks the Vagrant demo (Vagrantfile, deploy/) as far as a machine that cannot boot VMs can:
#   1. ruby -c on the Vagrantfile;
#   2. vagrant validate --ignore-provider for the default and the larger topologies, offline, and
#      that bad settings are refused; an Apple Silicon host (APPLE_SILICON=1) is told what it
#      needs instead of failing at the box download;
#   3. shellcheck on every *.sh in deploy/ and .ci/, and no bash-4-only syntax in the scripts a
#      host runs (macOS has bash 3.2);
#   4. deploy/render-config.sh for each role: the files it writes, and that a second run changes
#      nothing;
#   5. deploy/build.sh's choice of where to build, against a stubbed cargo (and rustup): a cargo
#      older than the workspace's rust-version leaves the build to a VM instead of failing;
#   6. deploy/install-binaries.sh --check: BUILD_IN_VM=1 makes a VM rebuild binaries the host built;
#   7. deploy/lib.sh's exe_replaced, which provision.sh uses to restart Consul after its package
#      changed, on a real process whose program is replaced the way dpkg replaces it;
#   8. deploy/demo.sh -n: the commands the demo would run, for WORKERS=1 and the default;
#   9. systemd unit syntax (our units and our drop-in for consul.service) with
#      systemd-analyze verify, when it is available.
# Installs vagrant, ruby and shellcheck with apt-get when missing (CI: root on Debian 12).
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
agent= # a process the exe_replaced check starts
cleanup() {
  if [[ -n "$agent" ]]; then kill "$agent" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

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
    -u CONSUL_VERSION -u BUILD_IN_VM -u APPLE_SILICON "$@" "${offline[@]}" \
    vagrant validate --ignore-provider
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

validate CONSUL_SERVERS=3 WORKERS=5 LIBVIRT_SYNC=rsync BUILD_IN_VM=1 APPLE_SILICON=0 \
  >"$tmp/validate3.out" 2>&1 || {
  cat "$tmp/validate3.out"
  fail "vagrant validate with CONSUL_SERVERS=3 WORKERS=5"
}
for vm in consul1 consul2 consul3 balancer worker1 worker5; do
  grep -q "^==> $vm:" "$tmp/validate3.out" || fail "CONSUL_SERVERS=3 WORKERS=5 has no VM $vm"
done
echo "CONSUL_SERVERS=3 WORKERS=5: $(grep -c '^==> ' "$tmp/validate3.out") VMs validated"

for bad in CONSUL_SERVERS=2 WORKERS=0 WORKERS=x LIBVIRT_SYNC=smb APPLE_SILICON=maybe; do
  if validate "$bad" >"$tmp/bad.out" 2>&1; then
    fail "vagrant validate accepted $bad"
  fi
  grep -q "${bad%%=*}" "$tmp/bad.out" || {
    cat "$tmp/bad.out"
    fail "the error for $bad does not name ${bad%%=*}"
  }
done
echo "bad settings are refused with a message naming them"

# Apple Silicon: without a BOX the Vagrantfile says what to choose; with one, a Vagrant that
# cannot pick a box's arm64 build (before 2.4.0) is told which version it needs.
if validate APPLE_SILICON=1 >"$tmp/mac.out" 2>&1; then
  fail "APPLE_SILICON=1 without BOX was accepted"
fi
if ! { grep -q 'give it as BOX' "$tmp/mac.out" && grep -q -- '--architecture arm64' "$tmp/mac.out"; }; then
  cat "$tmp/mac.out"
  fail "APPLE_SILICON=1 without BOX: the message does not say how to choose a box"
fi
vagrant_version=$(vagrant --version | awk '{print $2}')
if [[ "$(printf '%s\n2.4.0\n' "$vagrant_version" | sort -V | head -n1)" != 2.4.0 ]]; then
  if validate APPLE_SILICON=1 BOX=bento/ubuntu-24.04 >"$tmp/mac.out" 2>&1; then
    fail "APPLE_SILICON=1 was accepted by Vagrant $vagrant_version, which cannot pick arm64 boxes"
  fi
  grep -q 'Install Vagrant 2.4.2 or newer for VirtualBox 7.1' "$tmp/mac.out" || {
    cat "$tmp/mac.out"
    fail "APPLE_SILICON=1 with Vagrant $vagrant_version: the message does not name the version needed"
  }
  echo "APPLE_SILICON=1: told to set BOX, and that Vagrant $vagrant_version is too old"
else
  validate APPLE_SILICON=1 BOX=bento/ubuntu-24.04 >"$tmp/mac.out" 2>&1 || {
    cat "$tmp/mac.out"
    fail "vagrant validate with APPLE_SILICON=1 BOX=bento/ubuntu-24.04"
  }
  echo "APPLE_SILICON=1: told to set BOX; with BOX set, Vagrant $vagrant_version validates it"
fi
[[ ! -e .vagrant ]] || echo "(note: a .vagrant/ directory exists; it was not created by this check)"

echo "== shellcheck deploy/ .ci/"
mapfile -t scripts < <(find deploy .ci -name bin -prune -o -type f -name '*.sh' -print | LC_ALL=C sort)
((${#scripts[@]})) || fail "no scripts found"
printf '  %s\n' "${scripts[@]}"
shellcheck -x "${scripts[@]}"

# build.sh and lib.sh run on the host, and macOS's /bin/bash is 3.2. shellcheck has no notion of
# bash versions, so look for the bash-4-only syntax by name: case conversion (${v,,} ${v^^}),
# associative arrays and namerefs, mapfile/readarray, coproc, |& and &>>, ;;& and ;&, ${v@Q}.
bash4='\$\{[A-Za-z0-9_#!]*(\[[^]]*\])?(,,?|\^\^?)[^}]*\}|(declare|local|typeset) -[a-zA-Z]*[An]|\b(mapfile|readarray|coproc)\b|\|&|&>>|;;&|;&|\$\{[^}]*@[QEPAKa]\}'
for script in deploy/build.sh deploy/lib.sh; do
  if grep -nvE '^[[:space:]]*#' "$script" | grep -E "$bash4"; then
    fail "$script uses bash-4-only syntax (above); it must run under bash 3.2"
  fi
done
echo "deploy/build.sh, deploy/lib.sh: no bash-4-only syntax"

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

echo "== deploy/build.sh: where the binaries are built, against a stubbed cargo"
# A copy of what build.sh reads (its source_id hashes only the paths that exist), so nothing is
# built into this checkout's deploy/bin/. The tools come from a directory of links to the real
# ones, so that no cargo or rustup of this machine is found; cargo and rustup are stubs that log
# their arguments, and getconf says glibc 2.39 (the VMs'), whatever this machine has.
repo="$tmp/repo"
mkdir -p "$repo"
cp -r deploy Cargo.toml rust-toolchain.toml "$repo/"
rm -rf "$repo/deploy/bin"
tools="$tmp/tools"
mkdir -p "$tools"
for tool in awk cat cut dirname find grep head mkdir sed sha256sum sort tr uname xargs; do
  ln -s "$(command -v "$tool")" "$tools/$tool"
done
printf '#!/bin/sh\necho glibc 2.39\n' >"$tools/getconf"
chmod 0755 "$tools/getconf"
stubs="$tmp/stubs"
mkdir -p "$stubs"
cat >"$stubs/cargo" <<'STUB'
#!/bin/sh
echo "cargo $*" >>"$STUB_LOG"
case "$1" in
  --version) echo "cargo $STUB_CARGO_VERSION (stub)" ;;
  *) exit 3 ;;
esac
STUB
cat >"$stubs/rustup" <<'STUB'
#!/bin/sh
echo "rustup $*" >>"$STUB_LOG"
if [ "$1 $2" = "toolchain list" ]; then
  echo "${STUB_RUSTUP_LIST:-no installed toolchains}"
  exit 0
fi
exit "${STUB_RUSTUP_STATUS:-0}"
STUB
chmod 0755 "$stubs/cargo" "$stubs/rustup"
mkdir -p "$tmp/no-rustup"
ln -s "$stubs/cargo" "$tmp/no-rustup/cargo"
# $1: PATH directory with the stubs; then VAR=value settings. Output in $tmp/build.out, the
# stubs' calls in $tmp/build.log; returns build.sh's status.
host_build() {
  local stubdir=$1
  shift
  : >"$tmp/build.log"
  local status=0
  env -i HOME="$tmp" PATH="$stubdir:$tools" STUB_LOG="$tmp/build.log" "$@" \
    "$BASH" "$repo/deploy/build.sh" >"$tmp/build.out" 2>&1 || status=$?
  if grep -q 'command not found' "$tmp/build.out"; then
    cat "$tmp/build.out"
    fail "build.sh needs a tool this check does not link into its PATH"
  fi
  return "$status"
}
need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml)
channel=$(sed -n 's/^channel *= *"\([^"]*\)".*/\1/p' rust-toolchain.toml)
[[ -n "$need" && -n "$channel" ]] || fail "no rust-version in Cargo.toml or channel in rust-toolchain.toml"

# A distribution's cargo and no rustup: the VM builds, and vagrant up goes on (exit 0).
host_build "$tmp/no-rustup" STUB_CARGO_VERSION=1.75.0 || {
  cat "$tmp/build.out"
  fail "build.sh failed with cargo 1.75.0 and no rustup; it must leave the build to a VM"
}
if ! { grep -q "is version 1.75.0, older than the workspace's rust-version $need" "$tmp/build.out" \
  && grep -q 'the first VM provisioned builds the binaries instead' "$tmp/build.out"; }; then
  cat "$tmp/build.out"
  fail "build.sh with cargo 1.75.0 does not say that a VM builds, and why"
fi
[[ "$(cat "$tmp/build.log")" == "cargo --version" ]] || fail "cargo 1.75.0 was asked more than its version: $(cat "$tmp/build.log")"
echo "cargo 1.75.0, no rustup: $(grep -o 'build: .*' "$tmp/build.out" | cut -c1-60)..."

# A new enough cargo without rustup builds on the host (the stub's build fails with 3).
if host_build "$tmp/no-rustup" STUB_CARGO_VERSION="$need.0"; then
  fail "build.sh succeeded although the stubbed cargo build failed"
fi
grep -qx 'cargo build --release --locked -p discovery -p worker -p balancer' "$tmp/build.log" || {
  cat "$tmp/build.out"
  fail "build.sh with cargo $need.0 did not build on the host"
}
echo "cargo $need.0, no rustup: builds on the host"

# rustup: the pinned toolchain is installed explicitly, with its components, before building.
host_build "$stubs" STUB_CARGO_VERSION="$channel" || true
if ! { grep -qx "rustup toolchain install $channel --profile minimal --component rustfmt --component clippy" \
  "$tmp/build.log" && grep -qx 'cargo build --release --locked -p discovery -p worker -p balancer' \
  "$tmp/build.log"; }; then
  cat "$tmp/build.out" "$tmp/build.log"
  fail "build.sh with rustup did not install $channel and then build"
fi
echo "rustup: rustup toolchain install $channel, then cargo build"
host_build "$stubs" STUB_CARGO_VERSION="$channel" STUB_RUSTUP_LIST="$channel-x86_64-unknown-linux-gnu (default)" || true
if grep -q '^rustup toolchain install' "$tmp/build.log" || ! grep -q '^cargo build' "$tmp/build.log"; then
  cat "$tmp/build.out" "$tmp/build.log"
  fail "build.sh with $channel already installed did not go straight to the build"
fi
echo "rustup with $channel installed: no install, cargo build"
host_build "$stubs" STUB_CARGO_VERSION="$channel" STUB_RUSTUP_STATUS=1 || {
  cat "$tmp/build.out"
  fail "build.sh failed when rustup could not install the toolchain; it must leave the build to a VM"
}
if ! grep -q 'rustup could not install the pinned toolchain' "$tmp/build.out" \
  || grep -q '^cargo build' "$tmp/build.log"; then
  fail "a failed rustup install did not leave the build to a VM"
fi
echo "rustup failing: the VM builds"

# BUILD_IN_VM in any case: nothing is even asked of cargo.
host_build "$stubs" STUB_CARGO_VERSION="$channel" BUILD_IN_VM=Yes || fail "build.sh with BUILD_IN_VM=Yes"
if ! grep -q 'BUILD_IN_VM is set' "$tmp/build.out" || [[ -s "$tmp/build.log" ]]; then
  fail "BUILD_IN_VM=Yes did not leave the build to a VM without touching cargo"
fi
echo "BUILD_IN_VM=Yes: the VM builds"

echo "== deploy/install-binaries.sh --check: when a VM builds"
# deploy/bin/ as the host leaves it, with stand-in binaries that answer --version.
for b in discovery worker balancer; do
  printf '#!/bin/sh\necho "%s 0.0.0"\n' "$b" >"$repo/deploy/$b.stand-in"
done
mkdir -p "$repo/deploy/bin"
for b in discovery worker balancer; do
  install -m 0755 "$repo/deploy/$b.stand-in" "$repo/deploy/bin/$b"
done
rm -f "$repo"/deploy/*.stand-in
echo host >"$repo/deploy/bin/BUILT_BY"
bash -c '. deploy/lib.sh && source_id "$1"' _ "$repo" >"$repo/deploy/bin/SOURCE_ID"
check() { env -u BUILD_IN_VM "$@" "$repo/deploy/install-binaries.sh" --check; }
check || fail "current binaries from the host were not taken as they are"
if check BUILD_IN_VM=1; then fail "BUILD_IN_VM=1 took the host's binaries as they are"; fi
echo "vm consul" >"$repo/deploy/bin/BUILT_BY"
check BUILD_IN_VM=1 || fail "BUILD_IN_VM=1 did not take binaries a VM built"
echo stale >"$repo/deploy/bin/SOURCE_ID"
if check; then fail "binaries of other sources were taken as they are"; fi
set +e
"$repo/deploy/install-binaries.sh" --bogus 2>/dev/null
status=$?
set -e
((status == 64)) || fail "install-binaries.sh --bogus exited $status, not 64"
echo "host-built binaries: kept, or rebuilt in a VM with BUILD_IN_VM=1; VM-built ones kept"

echo "== deploy/lib.sh exe_replaced: a package replaced the program of a running process"
cp "$(command -v sleep)" "$tmp/agent"
"$tmp/agent" 60 &
agent=$!
replaced() { bash -c '. deploy/lib.sh && exe_replaced "$1"' _ "$agent"; }
if replaced; then fail "exe_replaced says an untouched program was replaced"; fi
# What dpkg does: unpack beside the file, then rename over it.
cp "$tmp/agent" "$tmp/agent.dpkg-new"
mv -f "$tmp/agent.dpkg-new" "$tmp/agent"
replaced || fail "exe_replaced missed a program replaced under its running process"
kill "$agent"
wait "$agent" 2>/dev/null || true
agent=
echo "a process whose program was replaced is found (provision.sh then restarts Consul)"

echo "== deploy/demo.sh -n: the demo's commands"
WORKERS=1 deploy/demo.sh -n >"$tmp/demo1.out"
if ! grep -qxF "\$ vagrant ssh worker1 -c 'sudo systemctl stop worker'" "$tmp/demo1.out" \
  || grep -q worker2 "$tmp/demo1.out"; then
  cat "$tmp/demo1.out"
  fail "WORKERS=1 deploy/demo.sh does not use worker1 alone"
fi
env -u WORKERS -u CONSUL_SERVERS deploy/demo.sh -n >"$tmp/demo3.out"
expect_lines "$tmp/demo3.out" "\$ vagrant ssh worker2 -c 'sudo systemctl stop worker'" \
  "\$ vagrant ssh worker2 -c 'sudo systemctl start worker'" "\$ vagrant ssh consul -c 'consul members'"
CONSUL_SERVERS=3 deploy/demo.sh -n members >"$tmp/demo-members.out"
expect_lines "$tmp/demo-members.out" "\$ vagrant ssh consul1 -c 'consul members'"
if WORKERS=0 deploy/demo.sh -n >/dev/null 2>&1; then fail "deploy/demo.sh accepted WORKERS=0"; fi
echo "WORKERS=1 uses worker1, the default worker2; CONSUL_SERVERS=3 asks consul1"

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
