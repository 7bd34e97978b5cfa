#!/usr/bin/env bash
# Builds discovery, worker and balancer ONCE on the host and puts them in deploy/bin/, which every
# VM sees at /vagrant/deploy/bin. The Vagrantfile runs it before `vagrant up|provision|reload`,
# once per vagrant command; run it by hand as well if you like.
#
# It builds only when the result is sure to run on the VMs (Ubuntu 24.04): a Linux host on
# x86_64 or aarch64, with cargo, and a glibc no newer than the box's. Otherwise (macOS, Windows,
# a newer-glibc distribution, or BUILD_IN_VM=1) it builds nothing and exits 0: the first VM that
# finds deploy/bin/ missing or stale builds there, and the others wait for it (provision.sh).
#
# deploy/bin/SOURCE_ID records the sources the binaries were built from; when it matches the
# working tree the build is skipped altogether.
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$deploy")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$deploy/lib.sh"

vm_builds() {
  log "build: $1; the first VM provisioned builds the binaries instead"
  exit 0
}

if truthy "${BUILD_IN_VM:-0}"; then
  vm_builds "BUILD_IN_VM is set"
fi
[[ "$(uname -s)" == Linux ]] || vm_builds "host is not Linux"
case "$(uname -m)" in
  x86_64 | aarch64) ;;
  *) vm_builds "host architecture $(uname -m) has no matching box" ;;
esac
command -v cargo >/dev/null 2>&1 || vm_builds "no cargo on this host"
glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}') || glibc=
[[ -n "$glibc" ]] || vm_builds "host C library is not glibc"
if [[ "$(printf '%s\n%s\n' "$glibc" "$VM_GLIBC" | sort -V | tail -n1)" != "$VM_GLIBC" ]]; then
  vm_builds "host glibc $glibc is newer than the VMs' $VM_GLIBC"
fi

bin="$deploy/bin"
want=$(source_id "$root")
have=$(cat "$bin/SOURCE_ID" 2>/dev/null || true)
up_to_date=1
for b in "${BINARIES[@]}"; do
  [[ -x "$bin/$b" ]] || up_to_date=0
done
if ((up_to_date)) && [[ "$have" == "$want" ]]; then
  log "build: deploy/bin/ is up to date with the sources"
  exit 0
fi

log "build: cargo build --release --locked -p discovery -p worker -p balancer (on the host, once)"
cd "$root"
cargo build --release --locked -p discovery -p worker -p balancer

# Honour CARGO_TARGET_DIR or a build.target-dir in .cargo/config.toml.
target=$(cargo metadata --format-version 1 --no-deps \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n "$target" ]] || target="$root/target"

mkdir -p "$bin"
for b in "${BINARIES[@]}"; do
  publish "$target/release/$b" "$bin/$b"
done
# Written last: a VM trusts the binaries only once the fingerprint matches.
publish_text "$bin/SOURCE_ID" "$want"
log "build: $(printf '%s ' "${BINARIES[@]}")-> deploy/bin/"
