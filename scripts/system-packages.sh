#!/bin/sh
# The Debian/Ubuntu packages the README's two commands need, installed when missing.
#
#   scripts/system-packages.sh start    what `npm start` needs (npm runs this first: prestart)
#   scripts/system-packages.sh test     what `npm test` needs (npm runs this first: pretest; .ci/run too)
#   scripts/system-packages.sh test --check   say what is missing, install nothing (exit 1 if anything is)
#
# Idempotent: with everything installed it prints nothing and exits 0 at once. As root with apt-get
# it installs exactly the missing packages, never starting their services (a policy-rc.d that
# refuses them is in place during the install and removed afterwards if this script put it there).
# Without root or without apt-get it prints the packages and the one command that installs them,
# and exits 1 with one clear line, instead of a suite that fails by the dozen.
# POLYDEV_SKIP_SYSTEM_PACKAGES=1 skips the check (a machine with equivalents installed otherwise).
set -eu

usage() {
  echo "usage: $0 start|test [--check]" >&2
  exit 2
}

[ $# -ge 1 ] || usage
what=$1
check_only=0
if [ $# -ge 2 ]; then
  [ "$2" = "--check" ] || usage
  check_only=1
fi
[ $# -le 2 ] || usage

case "$what" in
  # The daemon programs iptables inside a network namespace of its own (ip netns).
  start) packages="iptables iproute2 procps docker.io busybox-static coturn tinyproxy" ;;
  # Real servers the tests start (see the README, "Tests: what is real").
  test) packages="iptables iproute2 tinyproxy procps docker.io busybox-static coturn openssl prometheus prometheus-alertmanager chromium systemd" ;;
  *) usage ;;
esac

[ "${POLYDEV_SKIP_SYSTEM_PACKAGES:-}" = "1" ] && exit 0

say() { echo "polydev-reconciler: $*" >&2; }

if ! command -v dpkg-query >/dev/null 2>&1; then
  say "npm $what needs these Debian/Ubuntu packages (or their equivalents): $packages."
  say "This system has no dpkg: install them with its package manager, then run with POLYDEV_SKIP_SYSTEM_PACKAGES=1."
  exit 1
fi

missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# kubectl (for `kubectl kustomize` in test/kubernetes-manifests.test.ts): any will do, Debian's if none.
if [ "$what" = test ] && ! command -v kubectl >/dev/null 2>&1; then
  missing="$missing kubernetes-client"
fi
missing=${missing# }
[ -n "$missing" ] || exit 0

command_line="apt-get update && apt-get install -y --no-install-recommends $missing"
if [ "$check_only" = 1 ]; then
  say "missing for npm $what: $missing (install: $command_line)"
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  say "npm $what needs root (iptables, network namespaces) and these packages: $missing"
  say "run as root: $command_line"
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "missing for npm $what: $missing, and there is no apt-get here: install them, then run again"
  exit 1
fi

say "installing the system packages npm $what needs: $missing"
# Packages must not start their services on install: there may be no init system to own them,
# and the tests start their own servers on loopback.
policy=${POLYDEV_POLICY_RC_D:-/usr/sbin/policy-rc.d} # another path only for the script's own tests
ours=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  ours=1
fi
cleanup() {
  if [ "$ours" = 1 ]; then rm -f "$policy"; fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# shellcheck disable=SC2086 # the package list is meant to split into words
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  rm -f "$log"
  say "installing $missing failed (apt-get's last lines are above); run it by hand: $command_line"
  exit 1
fi
rm -f "$log"
say "installed: $missing"
