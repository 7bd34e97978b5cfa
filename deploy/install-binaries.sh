#!/usr/bin/env bash
# Installs discovery, worker and balancer into /usr/local/bin (INSTALL_BIN_DIR) from deploy/bin/
# (the synced folder), building them first if needed. Prints the path of each binary that changed.
#
# deploy/bin/ is normally filled once on the host by build.sh before any VM is provisioned.
# When it is missing, stale (its SOURCE_ID does not match the sources) or does not run here,
# the first VM to get here takes deploy/bin/.build-lock and builds inside the VM; every other VM
# waits for the result. This needs a two-way synced folder (VirtualBox's default; NFS on libvirt).
# The Vagrantfile clears a lock left by an interrupted run at the start of each vagrant command.
#
# BUILD_IN_VM=1 (passed on by the Vagrantfile) also counts binaries built on the host as stale, so
# a VM builds them even when deploy/bin/ matches the sources; binaries a VM built are kept.
#
#   install-binaries.sh --check    only tells: exits 0 when deploy/bin/ would be installed as it
#                                  is, 1 when this VM would build (or wait for another VM) first
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$deploy")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$deploy/lib.sh"

bin="$deploy/bin"
dest=${INSTALL_BIN_DIR:-/usr/local/bin}
lock="$bin/.build-lock"
wait_minutes=${BUILD_WAIT_MINUTES:-60}
want=$(source_id "$root")

# True when deploy/bin/ holds binaries built from these sources that run on this VM.
ready() {
  local b tmp status=0
  [[ "$(cat "$bin/SOURCE_ID" 2>/dev/null || true)" == "$want" ]] || return 1
  if truthy "${BUILD_IN_VM:-0}" && [[ "$(cat "$bin/BUILT_BY" 2>/dev/null || true)" != vm* ]]; then
    return 1
  fi
  tmp=$(mktemp -d)
  for b in "${BINARIES[@]}"; do
    # Run a local copy: a synced folder may be mounted noexec. A binary from a host with
    # another architecture or a newer glibc fails here, and the VM builds its own.
    if ! cp "$bin/$b" "$tmp/$b" 2>/dev/null || ! chmod 0755 "$tmp/$b" \
      || ! "$tmp/$b" --version >/dev/null 2>&1; then
      status=1
      break
    fi
  done
  rm -rf "$tmp"
  return "$status"
}

build_here() {
  log "binaries: building in this VM (first build: about 5-10 minutes)"
  export DEBIAN_FRONTEND=noninteractive
  if ! command -v cc >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
      build-essential ca-certificates curl
  fi
  export RUSTUP_HOME=${RUSTUP_HOME:-/opt/rustup} CARGO_HOME=${CARGO_HOME:-/opt/cargo}
  export PATH="$CARGO_HOME/bin:$PATH"
  if ! command -v rustup >/dev/null 2>&1; then
    # rustup's installer, non-interactive, with no toolchain: the next step installs the pinned one.
    curl --proto '=https' --tlsv1.2 -fsSL --retry 3 https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain none
  fi
  install_toolchain "$root"

  # rustc and the linker want more memory than a small VM has: lend them a swap file.
  if [[ ! -e "$swap" ]] && (($(awk '/MemTotal/ {print $2}' /proc/meminfo) < 3000000)); then
    if ! { fallocate -l 2G "$swap" && chmod 0600 "$swap" && mkswap -q "$swap" && swapon "$swap"; }; then
      log "binaries: no swap file (continuing without)"
    fi
  fi

  # The target directory lives on the VM's disk: a synced folder is slow and can lack features.
  local target=/var/cache/cluster-build
  (
    cd "$root"
    CARGO_TARGET_DIR="$target" cargo build --release --locked -p discovery -p worker -p balancer
  )
  for b in "${BINARIES[@]}"; do
    publish "$target/release/$b" "$bin/$b"
  done
  publish_text "$bin/BUILT_BY" "vm $(hostname)"
  publish_text "$bin/SOURCE_ID" "$want"
}

case "${1:-}" in
  "") ;;
  --check) if ready; then exit 0; else exit 1; fi ;;
  *)
    echo "usage: $0 [--check]" >&2
    exit 64
    ;;
esac

swap=/var/tmp/build.swap
# Runs on exit, also when the build fails: take back the swap file, then release the lock.
release() {
  if [[ -e "$swap" ]]; then
    swapoff "$swap" 2>/dev/null || true
    rm -f "$swap"
  fi
  rm -f "$lock/owner"
  rmdir "$lock" 2>/dev/null || true
}

if ! ready; then
  mkdir -p "$bin"
  if mkdir "$lock" 2>/dev/null; then
    trap release EXIT
    printf '%s\n' "$(hostname) since $(date -u +%FT%TZ)" >"$lock/owner" 2>/dev/null || true
    build_here
    release
    trap - EXIT
  else
    log "binaries: $(cat "$lock/owner" 2>/dev/null || echo 'another VM') is building them; waiting"
    deadline=$((SECONDS + wait_minutes * 60))
    until ready; do
      if ((SECONDS >= deadline)); then
        die "no binaries in deploy/bin/ after $wait_minutes minutes; if no VM is building them, remove deploy/bin/.build-lock and run 'vagrant provision'"
      fi
      if [[ ! -d "$lock" ]] && ! ready; then
        die "the VM that held deploy/bin/.build-lock stopped without usable binaries; see its output, then run 'vagrant provision'"
      fi
      sleep 5
    done
  fi
fi

mkdir -p "$dest"
for b in "${BINARIES[@]}"; do
  if ! cmp -s "$bin/$b" "$dest/$b"; then
    install -m 0755 "$bin/$b" "$dest/.$b.new"
    mv -f "$dest/.$b.new" "$dest/$b"
    printf '%s\n' "$dest/$b"
  fi
done
log "binaries: $("$dest/worker" --version), $("$dest/balancer" --version), $("$dest/discovery" --version)"
