#!/usr/bin/env bash
# Builds discovery, worker and balancer ONCE on the host and puts them in deploy/bin/, which every
# VM sees at /vagrant/deploy/bin. The Vagrantfile runs it before `vagrant up|provision|reload`,
# once per vagrant command; run it by hand as well if you like.
#
# It builds only when the result is sure to run on the VMs (Ubuntu 24.04): a Linux host on
# x86_64 or aarch64, with a glibc no newer than the box's, and a Rust toolchain that can build
# the workspace: rustup (which installs the toolchain rust-toolchain.toml pins), or a cargo at
# least as new as the workspace's rust-version. A distribution's cargo (Ubuntu 24.04: 1.75,
# Debian 12: 1.63) ignores rust-toolchain.toml and is too old. Otherwise (macOS, Windows, a
# newer-glibc distribution, an old cargo without rustup, or BUILD_IN_VM=1) it builds nothing,
# says why, and exits 0: the first VM that finds deploy/bin/ missing or stale builds there, and
# the others wait for it (install-binaries.sh).
#
# deploy/bin/SOURCE_ID records the sources the binaries were built from; when it matches the
# working tree the build is skipped altogether. deploy/bin/BUILT_BY says where they were built.
#
# Runs under bash 3.2 (macOS's /bin/bash) as far as it gets there, which is the "not Linux" exit.
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
glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}') || glibc=
[[ -n "$glibc" ]] || vm_builds "host C library is not glibc"
if ! version_at_least "$VM_GLIBC" "$glibc"; then
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

# A toolchain that can build this workspace. rustup's cargo follows rust-toolchain.toml once the
# pinned toolchain is installed; any other cargo must be new enough by itself.
need=$(rust_version "$root")
if command -v rustup >/dev/null 2>&1; then
  install_toolchain "$root" || vm_builds "rustup could not install the pinned toolchain"
  why="the cargo first on PATH is not rustup's"
elif command -v cargo >/dev/null 2>&1; then
  why="there is no rustup to install the toolchain rust-toolchain.toml pins (a distribution's cargo ignores that file; rustup from https://rustup.rs does not)"
else
  vm_builds "no cargo and no rustup on this host"
fi
cargo_version=$(cd "$root" && cargo --version 2>/dev/null | awk '{print $2}') || cargo_version=
cargo_version=${cargo_version%%-*}
if [[ -z "$cargo_version" ]] || ! version_at_least "$cargo_version" "$need"; then
  vm_builds "$(command -v cargo) is version ${cargo_version:-unknown}, older than the workspace's rust-version $need, and $why"
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
publish_text "$bin/BUILT_BY" host
# Written last: a VM trusts the binaries only once the fingerprint matches.
publish_text "$bin/SOURCE_ID" "$want"
log "build: $(printf '%s ' "${BINARIES[@]}")-> deploy/bin/"
