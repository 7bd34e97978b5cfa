#!/usr/bin/env bash
# Installs HashiCorp Consul from HashiCorp's apt repository (the `consul` package brings the
# consul user, /opt/consul and the consul.service unit). Idempotent: the key, the source list and
# the package are each left alone when already in place.
#
# CONSUL_VERSION (optional) pins the package, e.g. CONSUL_VERSION=1.20.2-1.
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$deploy/lib.sh"

export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confold "$@"; }

keyring=/usr/share/keyrings/hashicorp-archive-keyring.gpg
list=/etc/apt/sources.list.d/hashicorp.list

need_update=0
missing=()
for cmd in curl gpg lsb_release; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if ((${#missing[@]})); then
  log "consul: installing curl, gnupg, lsb-release"
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends ca-certificates curl gnupg lsb-release
fi

if [[ ! -s "$keyring" ]]; then
  log "consul: adding HashiCorp's signing key"
  tmp=$(mktemp)
  curl -fsSL --retry 3 https://apt.releases.hashicorp.com/gpg | gpg --batch --yes --dearmor -o "$tmp"
  install -m 0644 "$tmp" "$keyring"
  rm -f "$tmp"
  need_update=1
fi

line="deb [arch=$(dpkg --print-architecture) signed-by=$keyring] https://apt.releases.hashicorp.com $(lsb_release -cs) main"
if [[ "$(cat "$list" 2>/dev/null || true)" != "$line" ]]; then
  log "consul: adding $list"
  printf '%s\n' "$line" >"$list"
  need_update=1
fi

installed=$(dpkg-query -W -f '${Status} ${Version}' consul 2>/dev/null || true)
wanted=${CONSUL_VERSION:+ $CONSUL_VERSION}
if [[ "$installed" != "install ok installed"* ]] \
  || { [[ -n "$wanted" ]] && [[ "$installed" != *"$wanted" ]]; }; then
  candidate=$(apt-cache policy consul 2>/dev/null | sed -n 's/^ *Candidate: //p')
  if ((need_update)) || [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
    apt_get update -qq
  fi
  pkg="consul${CONSUL_VERSION:+=$CONSUL_VERSION}"
  log "consul: apt-get install $pkg"
  # --allow-downgrades: a pinned CONSUL_VERSION may be older than the installed one.
  apt_get install -y -qq --no-install-recommends ${CONSUL_VERSION:+--allow-downgrades} "$pkg"
  # provision.sh restarts a running agent whose binary this replaced.
  before=${installed##* }
  log "consul: package ${before:-none} -> $(dpkg-query -W -f '${Version}' consul)"
fi
log "consul: $(consul version | head -n1)"
