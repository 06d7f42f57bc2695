#!/usr/bin/env bash
# Installs polydev-reconciler as a systemd service on a plain Debian host.
#
#   sudo scripts/install-host.sh                  # build, install, enable --now
#   sudo scripts/install-host.sh --no-start       # install and enable, do not start
#   scripts/install-host.sh --destdir /tmp/root   # lay everything out below /tmp/root only
#   scripts/install-host.sh --dry-run             # print what would be done
#
# Run it from a checkout where `npm ci` has been run (it compiles src/ with the checkout's
# TypeScript and copies the checkout's node_modules, pruned to production dependencies, so the
# native better-sqlite3 module built there is reused and no network is needed). --npm-ci runs
# `npm ci --omit=dev` in the install directory instead (needs the npm registry, and a compiler
# unless a prebuilt better-sqlite3 binary can be downloaded).
#
# What it does (every step is idempotent; running it again upgrades the app in place):
#   1. checks node (>= 20.19) and compiles src/ → dist/ in a staging directory
#   2. creates the system user and group `polydev` (home /var/lib/polydev, no login)
#   3. replaces PREFIX (/opt/polydev-reconciler) with package.json, package-lock.json, bin/,
#      dist/src/, crds/, manifests/examples/, README.md and node_modules/ (production only)
#   4. /etc/polydev (root:polydev 0750) with polydev-reconciler.yaml, api-token (a random token)
#      and desired.d/, each created only if missing: an operator's edits are never overwritten
#   5. the unit in /etc/systemd/system, plus drop-ins: docker.conf when the group `docker`
#      exists, iptables-legacy.conf when `iptables -V` says legacy
#   6. systemctl daemon-reload, enable --now (enable only with --no-start)
#
# With --destdir DIR every path is below DIR, no user is created and systemctl is not run: for
# packaging, and for the tests (test/systemd-unit.test.ts).
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/polydev-reconciler
DESTDIR=""
NODE=""
START=1
SYSTEMCTL=1
DRY_RUN=0
NPM_CI=0
DOCKER=auto
LEGACY=auto
SERVICE=polydev-reconciler
USER_NAME=polydev
MIN_NODE=20.19

usage() {
  cat <<EOF
usage: $0 [options]
  --destdir DIR        install below DIR (no user creation, no systemctl)
  --prefix DIR         application directory (default $PREFIX)
  --node PATH          node binary the unit runs (default: node on PATH)
  --no-start           enable the service but do not start it
  --no-systemctl       do not run systemctl at all
  --npm-ci             npm ci --omit=dev in PREFIX instead of copying node_modules
  --docker=auto|yes|no          install the docker.conf drop-in (group docker)
  --iptables-legacy=auto|yes|no install the iptables-legacy.conf drop-in
  --dry-run            print the actions, change nothing
EOF
}

die() { echo "install-host: $*" >&2; exit 1; }
log() { echo "install-host: $*"; }
# Runs a command, or prints it under --dry-run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) DESTDIR="${2:?--destdir needs a directory}"; shift 2 ;;
    --destdir=*) DESTDIR="${1#*=}"; shift ;;
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --node) NODE="${2:?--node needs a path}"; shift 2 ;;
    --node=*) NODE="${1#*=}"; shift ;;
    --no-start) START=0; shift ;;
    --no-systemctl) SYSTEMCTL=0; shift ;;
    --npm-ci) NPM_CI=1; shift ;;
    --docker=*) DOCKER="${1#*=}"; shift ;;
    --iptables-legacy=*) LEGACY="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

case "$PREFIX" in /*) ;; *) die "--prefix must be absolute: $PREFIX" ;; esac
case "$DOCKER" in auto|yes|no) ;; *) die "--docker must be auto, yes or no" ;; esac
case "$LEGACY" in auto|yes|no) ;; *) die "--iptables-legacy must be auto, yes or no" ;; esac
if [ -n "$DESTDIR" ]; then
  case "$DESTDIR" in /*) ;; *) DESTDIR="$(pwd)/$DESTDIR" ;; esac
  DESTDIR="${DESTDIR%/}"
  SYSTEMCTL=0
elif [ "$(id -u)" != 0 ] && [ "$DRY_RUN" = 0 ]; then
  die "run as root (or use --destdir DIR / --dry-run)"
fi

# ---- 1. node and the build ---------------------------------------------------------------
if [ -z "$NODE" ]; then NODE="$(command -v node || true)"; fi
[ -n "$NODE" ] || die "node not found on PATH (Node >= $MIN_NODE is required; or --node PATH)"
case "$NODE" in /*) ;; *) NODE="$(cd "$(dirname "$NODE")" && pwd)/$(basename "$NODE")" ;; esac
[ -x "$NODE" ] || die "$NODE is not executable"
NODE_VERSION="$("$NODE" -p 'process.versions.node')"
"$NODE" -e '
  const [a, b] = process.argv[1].split(".").map(Number), [x, y] = process.argv[2].split(".").map(Number);
  process.exit(a > x || (a === x && b >= y) ? 0 : 1);' "$NODE_VERSION" "$MIN_NODE" \
  || die "$NODE is Node $NODE_VERSION; Node >= $MIN_NODE is required"
[ -f "$SRC/package.json" ] && [ -d "$SRC/src" ] && [ -d "$SRC/crds" ] || die "$SRC is not a polydev-reconciler checkout"
[ -x "$SRC/node_modules/.bin/tsc" ] || die "$SRC/node_modules/.bin/tsc missing: run npm ci in $SRC first"
if [ "$NPM_CI" = 0 ]; then
  [ -d "$SRC/node_modules/better-sqlite3" ] || die "$SRC/node_modules is incomplete: run npm ci in $SRC first (or --npm-ci)"
fi

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/polydev-install.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
log "compiling $SRC/src with TypeScript (Node $NODE_VERSION at $NODE)"
# Only src/: tsconfig.json also covers test/ and bench/, which the installed app does not need.
cat >"$STAGE/tsconfig.json" <<EOF
{
  "extends": "$SRC/tsconfig.json",
  "compilerOptions": { "rootDir": "$SRC", "outDir": "$STAGE/dist", "sourceMap": false, "typeRoots": ["$SRC/node_modules/@types"] },
  "include": ["$SRC/src/**/*.ts"]
}
EOF
run "$NODE" "$SRC/node_modules/typescript/bin/tsc" -p "$STAGE/tsconfig.json" || die "TypeScript build failed"
[ "$DRY_RUN" = 1 ] || [ -f "$STAGE/dist/src/main.js" ] || die "the build did not produce dist/src/main.js"

# ---- 2. user -------------------------------------------------------------------------------
if [ -n "$DESTDIR" ]; then
  log "--destdir: not creating the user $USER_NAME (systemd needs it on the target host)"
elif getent passwd "$USER_NAME" >/dev/null; then
  log "user $USER_NAME exists"
else
  getent group "$USER_NAME" >/dev/null || run groupadd --system "$USER_NAME"
  run useradd --system --gid "$USER_NAME" --home-dir /var/lib/polydev --no-create-home \
    --shell /usr/sbin/nologin --comment "polydev reconciler" "$USER_NAME"
fi
# Owner of /etc/polydev: root:polydev, or root:root when the group does not exist (DESTDIR);
# no ownership at all when not run as root (a DESTDIR build by a normal user).
CONF_GROUP=root
if [ -z "$DESTDIR" ] && { getent group "$USER_NAME" >/dev/null || [ "$DRY_RUN" = 1 ]; }; then CONF_GROUP="$USER_NAME"; fi
OWN=()
if [ "$(id -u)" = 0 ]; then OWN=(-o 0 -g "$CONF_GROUP"); fi

# ---- 3. the application --------------------------------------------------------------------
APP="$DESTDIR$PREFIX"
NEW="$APP.new.$$"
log "installing the application into $APP"
run mkdir -p "$(dirname "$APP")"
run rm -rf "$NEW"
run install -d -m 0755 "$NEW" "$NEW/dist" "$NEW/manifests"
run cp "$SRC/package.json" "$SRC/package-lock.json" "$NEW/"
[ -f "$SRC/README.md" ] && run cp "$SRC/README.md" "$NEW/"
run cp -R "$SRC/bin" "$SRC/crds" "$NEW/"
run cp -R "$STAGE/dist/src" "$NEW/dist/src"
run cp -R "$SRC/manifests/examples" "$NEW/manifests/examples"
if [ "$NPM_CI" = 1 ]; then
  run sh -c 'cd "$1" && npm ci --omit=dev --no-audit --no-fund' sh "$NEW"
else
  # "/." copies the contents even if node_modules is a symlink (never prune the checkout's own).
  run install -d -m 0755 "$NEW/node_modules"
  run cp -R "$SRC/node_modules/." "$NEW/node_modules/"
  # Offline: removes devDependencies (and anything not in the lockfile) from the copy.
  run sh -c 'cd "$1" && npm prune --omit=dev --no-audit --no-fund --offline' sh "$NEW"
fi
# better-sqlite3 keeps its sources and object files next to the one file it loads (~30 MB).
BS3="$NEW/node_modules/better-sqlite3"
if [ "$DRY_RUN" = 1 ] || [ -f "$BS3/build/Release/better_sqlite3.node" ]; then
  run mv "$BS3/build/Release/better_sqlite3.node" "$BS3/better_sqlite3.node"
  run rm -rf "$BS3/build" "$BS3/deps" "$BS3/src"
  run install -d -m 0755 "$BS3/build/Release"
  run mv "$BS3/better_sqlite3.node" "$BS3/build/Release/better_sqlite3.node"
fi
if [ "$(id -u)" = 0 ]; then run chown -R 0:0 "$NEW"; fi
run chmod -R u+rwX,go+rX,go-w "$NEW"
# Swap the new tree in; the old one goes only after the new one is in place.
if [ -e "$APP" ] || [ "$DRY_RUN" = 1 ]; then run rm -rf "$APP.old"; run mv "$APP" "$APP.old" || true; fi
run mv "$NEW" "$APP"
run rm -rf "$APP.old"

# ---- 4. configuration ----------------------------------------------------------------------
ETC="$DESTDIR/etc/polydev"
run install -d "${OWN[@]}" -m 0750 "$ETC"
run install -d "${OWN[@]}" -m 0750 "$ETC/desired.d"
if [ -e "$ETC/polydev-reconciler.yaml" ]; then
  log "$ETC/polydev-reconciler.yaml exists: kept"
else
  cat >"$STAGE/polydev-reconciler.yaml" <<'EOF'
# polydev-reconciler on this host (see the configuration reference in README.md).
# Every setting can also come from its POLYDEV_* environment variable (a drop-in's Environment=).
database: /var/lib/polydev/polydev.db
# Desired-state YAML: the daemon watches this directory and applies it (all or nothing, with prune).
desiredStateDir: /etc/polydev/desired.d
listen: 127.0.0.1:9470
apiTokenFile: /etc/polydev/api-token
logLevel: info
resyncInterval: 30s
iptables:
  # auto: whatever `iptables` is here (nft on Debian 12). legacy also needs the
  # iptables-legacy.conf drop-in (CAP_NET_RAW).
  backend: auto
docker:
  socket: /var/run/docker.sock
EOF
  run install "${OWN[@]}" -m 0640 "$STAGE/polydev-reconciler.yaml" "$ETC/polydev-reconciler.yaml"
fi
if [ -e "$ETC/api-token" ]; then
  log "$ETC/api-token exists: kept"
else
  ( umask 077; "$NODE" -e 'process.stdout.write(require("node:crypto").randomBytes(32).toString("hex") + "\n")' >"$STAGE/api-token" )
  run install "${OWN[@]}" -m 0640 "$STAGE/api-token" "$ETC/api-token"
fi

# ---- 5. the unit and its drop-ins ----------------------------------------------------------
UNITDIR="$DESTDIR/etc/systemd/system"
DROPINS="$UNITDIR/$SERVICE.service.d"
log "installing $UNITDIR/$SERVICE.service"
# The unit names /usr/bin/node and /opt/polydev-reconciler; point it at this install.
sed -e "s#/opt/polydev-reconciler#$PREFIX#g" \
    -e "s#^ExecStart=/usr/bin/node #ExecStart=$NODE #" \
    "$SRC/manifests/systemd/$SERVICE.service" >"$STAGE/$SERVICE.service"
run install -d -m 0755 "$UNITDIR" "$DROPINS"
run install -m 0644 "$STAGE/$SERVICE.service" "$UNITDIR/$SERVICE.service"

if [ "$DOCKER" = auto ]; then
  if getent group docker >/dev/null; then DOCKER=yes; else DOCKER=no; fi
fi
if [ "$DOCKER" = yes ]; then
  run install -m 0644 "$SRC/manifests/systemd/$SERVICE.service.d/docker.conf" "$DROPINS/docker.conf"
else
  log "no group docker: WarmPools with engine docker will report EngineUnavailable (--docker=yes to add the drop-in)"
  run rm -f "$DROPINS/docker.conf"
fi
if [ "$LEGACY" = auto ]; then
  LEGACY=no
  if command -v iptables >/dev/null && iptables -V 2>/dev/null | grep -q legacy; then LEGACY=yes; fi
fi
if [ "$LEGACY" = yes ]; then
  run install -m 0644 "$SRC/manifests/systemd/$SERVICE.service.d/iptables-legacy.conf" "$DROPINS/iptables-legacy.conf"
else
  run rm -f "$DROPINS/iptables-legacy.conf"
fi

# ---- 6. systemd ----------------------------------------------------------------------------
if [ "$SYSTEMCTL" = 0 ]; then
  log "not running systemctl"
elif [ "$DRY_RUN" = 0 ] && [ ! -d /run/systemd/system ]; then
  log "systemd is not running here: skipped systemctl daemon-reload / enable"
else
  run systemctl daemon-reload
  if [ "$START" = 1 ]; then
    if systemctl is-active --quiet "$SERVICE.service" 2>/dev/null; then
      # An upgrade: the running daemon is restarted onto the new code.
      run systemctl enable "$SERVICE.service"
      run systemctl restart "$SERVICE.service"
    else
      run systemctl enable --now "$SERVICE.service"
    fi
  else
    run systemctl enable "$SERVICE.service"
  fi
fi
log "done: $APP, $ETC, $UNITDIR/$SERVICE.service"
