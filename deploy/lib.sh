# shellcheck shell=bash
# Helpers shared by the host build (build.sh) and the VM provisioning scripts. Sourced, not run.

# Used by the scripts that source this file.
# shellcheck disable=SC2034
{
  # The binaries every VM gets in /usr/local/bin.
  BINARIES=(discovery worker balancer)

  # glibc of the VMs' box (Ubuntu 24.04). Binaries linked on a host with a newer glibc may not
  # run there, so such hosts leave the build to a VM.
  VM_GLIBC=2.39
}

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# True for 1/yes/true/on (any case). Spelled out, not ${1,,}: build.sh sources this file on
# any host, and macOS's /bin/bash is 3.2, which lacks case conversion.
truthy() {
  case "$1" in
    1 | [Yy][Ee][Ss] | [Tt][Rr][Uu][Ee] | [Oo][Nn]) return 0 ;;
    *) return 1 ;;
  esac
}

# True when version $1 is at least $2 (dotted numbers, e.g. 1.95.0 and 1.95).
version_at_least() {
  [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" == "$2" ]]
}

# The workspace's minimum Rust (rust-version in Cargo.toml). $1: the repository root.
rust_version() {
  sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$1/Cargo.toml" | head -n1
}

# Installs the toolchain that rust-toolchain.toml pins, with its components, explicitly: rustup
# 1.28 stopped installing it on first use, so relying on that fails on some rustup versions.
# An installed one is left alone (installing it again can download it all again).
# $1: the repository root. Needs rustup on PATH.
install_toolchain() {
  local file="$1/rust-toolchain.toml" channel c
  local -a components=()
  channel=$(sed -n 's/^channel *= *"\([^"]*\)".*/\1/p' "$file")
  [[ -n "$channel" ]] || die "$file names no channel"
  if rustup toolchain list 2>/dev/null | grep -q "^$channel-"; then
    log "toolchain: $channel is installed"
    return 0
  fi
  for c in $(sed -n 's/^components *= *\[\(.*\)\].*/\1/p' "$file" | tr -d '",'); do
    components+=(--component "$c")
  done
  log "toolchain: rustup toolchain install $channel (from rust-toolchain.toml)"
  rustup toolchain install "$channel" --profile minimal ${components[@]+"${components[@]}"}
}

# True when the program running as process $1 was replaced on disk since it started (a package
# upgrade or downgrade renames the new file over the old one; the kernel then reports the old
# one as deleted), so the process still runs the old version until it is restarted.
exe_replaced() {
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [[ "$exe" == *" (deleted)" ]]
}

# Prints a fingerprint of everything the three binaries are built from, so a VM can tell
# whether deploy/bin/ matches the sources it sees. $1: the repository root.
source_id() {
  local root=$1 p
  local -a paths=()
  for p in Cargo.toml Cargo.lock rust-toolchain.toml .cargo discovery worker balancer; do
    [[ -e "$root/$p" ]] && paths+=("$p")
  done
  (
    cd "$root" || exit
    find "${paths[@]}" -name target -prune -o -type f -print \
      | LC_ALL=C sort \
      | xargs -r -d '\n' sha256sum \
      | sha256sum \
      | cut -c1-64
  )
}

# Copies $1 to $2 through a temporary file in $2's directory, so nobody sees a half-written file.
publish() {
  local src=$1 dst=$2 tmp
  tmp="$(dirname "$dst")/.$(basename "$dst").tmp.$$"
  cp "$src" "$tmp"
  chmod 0755 "$tmp"
  mv -f "$tmp" "$dst"
}

# Writes $2 into file $1 the same way.
publish_text() {
  local dst=$1 text=$2 tmp
  tmp="$(dirname "$dst")/.$(basename "$dst").tmp.$$"
  printf '%s\n' "$text" >"$tmp"
  mv -f "$tmp" "$dst"
}
