# polydev-reconciler, Node 20.
#
#   docker build -t polydev-reconciler .
#   docker build --build-arg NODE_IMAGE=registry.example/node:20-bookworm-slim -t polydev-reconciler .
#   docker build --build-arg BUILD_IMAGE=... --build-arg RUNTIME_IMAGE=... -t polydev-reconciler .
#
# The daemon programs the HOST's iptables, so it needs the host's network namespace and
# CAP_NET_ADMIN (iptables talks to netfilter over netlink; without it every run fails):
#
#   docker run -d --name polydev-reconciler --network host --cap-drop ALL --cap-add NET_ADMIN \
#     -v /etc/polydev:/etc/polydev:ro -v polydev-state:/var/lib/polydev polydev-reconciler
#
# Stages (works with BuildKit and with the classic builder):
#   base      the runtime OS layer: RUNTIME_IMAGE + iptables with file capabilities + the user
#             polydev (10001) + the default config, USER/HEALTHCHECK/ENTRYPOINT/CMD. No app yet.
#   prebuilt  base + an app tree taken from the build context's prebuilt/ (what
#             `scripts/install-host.sh --destdir CTX --prefix /prebuilt` lays out: package.json,
#             production node_modules, dist/src, crds, manifests/examples). For builders without
#             registry access; test/dockerfile.test.ts builds this target (see below).
#   build     BUILD_IMAGE: npm ci, better-sqlite3 compiled, tsc → dist/, npm prune --omit=dev.
#   runtime   base + the app from `build` (the default target, the last stage).
#
# What the test builds, and why: test/dockerfile.test.ts runs against a private dockerd with no
# registry, so node:20-bookworm-slim cannot be pulled and the build stage's apt-get/npm ci
# cannot run there. It assembles RUNTIME_IMAGE from the host's own files (busybox, the host's
# node and iptables-nft with the shared libraries ldd lists, setcap, useradd), builds
# `--target prebuilt` (BuildKit, which builds only the stages the target needs; the classic
# builder when the CLI has no BuildKit client, which builds only the stages up to the target) from
# a context holding this Dockerfile, .dockerignore and an app tree compiled on the host by
# install-host.sh, and runs the image: validate, run --once (as uid 10001, with iptables-nft
# through the file capability under --cap-drop ALL --cap-add NET_ADMIN) and the HEALTHCHECK.
# So everything in `base` is exercised; the `build` stage and the three COPY lines of `runtime`
# are not (they need a registry).
#
# Notes for running it:
# - Non-root (uid 10001). Docker gives a non-root process no effective capabilities, so the
#   iptables binaries carry file capabilities (set below): xtables-nft-multi cap_net_admin only
#   (nf_tables needs nothing else); xtables-legacy-multi also cap_net_raw (its raw socket).
#   They take effect only if the container's bounding set holds them (--cap-add NET_ADMIN; the
#   legacy binary also needs NET_RAW, which Docker grants by default unless --cap-drop ALL), and
#   not at all under --security-opt no-new-privileges.
# - net.ipv4.ip_forward: ProxyPool's default `ipForward: true` makes the daemon write
#   /proc/sys/net/ipv4/ip_forward. Docker mounts /proc/sys read-only, so this image cannot write
#   it. Set the sysctl on the host (sysctl.d), or use `ipForward: false`. Otherwise the pool goes
#   into Backoff.
# - Backend: the image's iptables uses nf_tables. On a host that uses iptables-legacy, set
#   `iptables.backend: legacy` in the config so the daemon sees the same rules as the host. The
#   legacy lock /run/xtables.lock is created below, owned by polydev. It is private to the
#   container: bind-mounting the host's root-owned lock needs --user 0.
# - One leader per database. A second container on the same state volume refuses to start
#   (its lease check sees a live holder: a dead holder's pid can only be checked within one pid
#   namespace, so a crashed container's lease is honoured until it expires, 15 s). With
#   `leaderElection.enabled: true` it waits as a standby instead and takes over then.
# - HEALTHCHECK probes 127.0.0.1:9470, the default `listen`. Change both together.
# - `docker stop` waits 10 s; the daemon's default shutdownTimeout (8 s) fits inside that.

ARG NODE_IMAGE=node:20-bookworm-slim
ARG BUILD_IMAGE=${NODE_IMAGE}
ARG RUNTIME_IMAGE=${NODE_IMAGE}

# ---- base: the runtime's OS layer (no application yet) --------------------------------------
FROM ${RUNTIME_IMAGE} AS base
ENV NODE_ENV=production
# apt-get only when the base image lacks iptables-nft or setcap (a Debian node image does; a base
# that already ships them, like the test's, is used as it is).
RUN if [ ! -x /usr/sbin/xtables-nft-multi ] || ! command -v setcap >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends iptables libcap2-bin \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && setcap cap_net_admin+ep /usr/sbin/xtables-nft-multi \
 && if [ -x /usr/sbin/xtables-legacy-multi ]; then \
      setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-legacy-multi; \
    fi
RUN groupadd --system --gid 10001 polydev \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/polydev --no-create-home \
      --shell /usr/sbin/nologin polydev \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/polydev \
 && install -o 10001 -g 10001 -m 0600 /dev/null /run/xtables.lock \
 && install -d -m 0755 /etc/polydev \
 && printf '%s\n' \
      '# Default config of the image; mount your own /etc/polydev over it (see README).' \
      'database: /var/lib/polydev/polydev.db' \
      'listen: 127.0.0.1:9470' \
      > /etc/polydev/polydev-reconciler.yaml
WORKDIR /app
USER 10001:10001
EXPOSE 9470
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:9470/healthz').then(r=>process.exit(r.ok?0:1)).catch(()=>process.exit(1))"]
# A 2 MB young generation: the daemon allocates in short bursts (a 10,000-rule save and plan per
# resync), and V8's default 16 MB semi-spaces let those bursts inflate RSS by ~25 MB for nothing
# (bench/results/proxy.json: peak RSS with 10,000 ports ~135 MB with it, ~160 MB without).
ENTRYPOINT ["node", "--max-semi-space-size=2", "dist/src/main.js"]
CMD ["run", "--config", "/etc/polydev/polydev-reconciler.yaml"]

# ---- prebuilt: base + an app tree built outside (see the header) ------------------------------
# Root-owned, read-only to the daemon, like the runtime stage's.
FROM base AS prebuilt
COPY prebuilt/package.json /app/package.json
COPY prebuilt/node_modules /app/node_modules
COPY prebuilt/dist/src /app/dist/src
COPY prebuilt/crds /app/crds
COPY prebuilt/manifests/examples /app/manifests/examples

# ---- build: full dependencies, better-sqlite3 compiled, TypeScript → dist/ --------------------
FROM ${BUILD_IMAGE} AS build
WORKDIR /app
# better-sqlite3 falls back to building from source (node-gyp) when no prebuilt binary is reachable.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci
COPY tsconfig.json ./
COPY src ./src
# Only src/ is copied: tsconfig also includes test/ and bench/, which the image does not need
# (and a type error in a test must not break the image). Then drop devDependencies, and
# better-sqlite3's sources and object files; the native module built above stays, so the
# runtime stage needs no compiler.
RUN npx tsc -p tsconfig.json \
 && npm prune --omit=dev \
 && npm cache clean --force \
 && cd node_modules/better-sqlite3 \
 && mv build/Release/better_sqlite3.node . \
 && rm -rf build deps src \
 && mkdir -p build/Release \
 && mv better_sqlite3.node build/Release/

# ---- runtime (default): base + production node_modules, compiled JS, CRDs --------------------
# The code finds crds/ by walking up from its module to the folder holding package.json and
# crds/: /app here (dist/src/desired/kinds.js → /app). Everything is root-owned, read-only to
# the daemon.
FROM base AS runtime
COPY --from=build /app/package.json /app/package.json
COPY --from=build /app/node_modules /app/node_modules
COPY --from=build /app/dist/src /app/dist/src
COPY crds /app/crds
COPY manifests/examples /app/manifests/examples
