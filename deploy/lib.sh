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

# True for 1/yes/true/on (any case).
truthy() {
  case "${1,,}" in
    1 | yes | true | on) return 0 ;;
    *) return 1 ;;
  esac
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
