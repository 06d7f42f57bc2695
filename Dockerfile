# polydev-reconciler, Node 20.
#
#   docker build -t polydev-reconciler .
#   docker build --build-arg NODE_IMAGE=local/node:20-bookworm-slim -t polydev-reconciler .
#
# The daemon programs the HOST's iptables, so it needs the host's network namespace and
# CAP_NET_ADMIN (iptables talks to netfilter over netlink; without it every run fails):
#
#   docker run -d --name polydev-reconciler --network host --cap-add NET_ADMIN \
#     -v /etc/polydev:/etc/polydev:ro -v polydev-state:/var/lib/polydev polydev-reconciler
#
# Notes for running it:
# - Non-root (uid 10001). Docker gives a non-root process no effective capabilities, so the
#   iptables binaries carry file capabilities (cap_net_admin,cap_net_raw+ep, set below). They
#   take effect only if the container's bounding set holds them (--cap-add NET_ADMIN), and not
#   at all under --security-opt no-new-privileges.
# - net.ipv4.ip_forward: ProxyPool's default `ipForward: true` makes the daemon write
#   /proc/sys/net/ipv4/ip_forward. That file is root-owned, and Docker mounts /proc/sys read-only
#   anyway, so this image cannot write it. Set the sysctl on the host (sysctl.d), or use
#   `ipForward: false`. Otherwise the pool goes into Backoff.
# - Backend: the image's iptables uses nf_tables. On a host that uses iptables-legacy, set
#   `iptables.backend: legacy` in the config so the daemon sees the same rules as the host. The
#   legacy lock /run/xtables.lock is created below, owned by polydev. It is private to the
#   container: bind-mounting the host's root-owned lock needs --user 0.
# - One container per database. The single-daemon lease treats a holder "on this host" with a
#   dead pid as gone. Host-network containers share the host's hostname but not its pid
#   namespace, so two containers on the same state volume could both run.
# - HEALTHCHECK probes 127.0.0.1:9470, the default `listen`. Change both together.
# - `docker stop` waits 10 s; the daemon's default shutdownTimeout (8 s) fits inside that.

ARG NODE_IMAGE=node:20-bookworm-slim

# ---- build: full dependencies, better-sqlite3 compiled, TypeScript → dist/ --------------------
FROM ${NODE_IMAGE} AS build
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
# (and a type error in a test must not break the image). Then drop devDependencies; the native
# module built above stays, so the runtime stage needs no compiler.
RUN npx tsc -p tsconfig.json \
 && npm prune --omit=dev \
 && npm cache clean --force

# ---- runtime: production node_modules, compiled JS, CRDs, iptables --------------------------
FROM ${NODE_IMAGE} AS runtime
ENV NODE_ENV=production
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables libcap2-bin \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-nft-multi \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-legacy-multi \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 polydev \
 && useradd --system --uid 10001 --gid polydev --home-dir /var/lib/polydev --no-create-home \
      --shell /usr/sbin/nologin polydev \
 && install -d -o polydev -g polydev -m 0700 /var/lib/polydev \
 && install -o polydev -g polydev -m 0600 /dev/null /run/xtables.lock \
 && install -d -m 0755 /etc/polydev \
 && printf '%s\n' \
      '# Default config of the image; mount your own /etc/polydev over it (see README).' \
      'database: /var/lib/polydev/polydev.db' \
      'listen: 127.0.0.1:9470' \
      > /etc/polydev/polydev-reconciler.yaml
WORKDIR /app
# The code finds crds/ by walking up from its module to the folder holding package.json and
# crds/: /app here (dist/src/desired/kinds.js → /app). Everything is root-owned, read-only to
# the daemon.
COPY --from=build /app/package.json ./package.json
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist/src ./dist/src
COPY crds ./crds
COPY manifests/examples ./manifests/examples
USER 10001:10001
EXPOSE 9470
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:9470/healthz').then(r=>process.exit(r.ok?0:1)).catch(()=>process.exit(1))"]
# A 2 MB young generation: the daemon allocates in short bursts (a 10,000-rule save and plan per
# resync), and V8's default 16 MB semi-spaces let those bursts inflate RSS by ~25 MB for nothing
# (bench/results/proxy.json: peak RSS with 10,000 ports ~135 MB with it, ~160 MB without).
ENTRYPOINT ["node", "--max-semi-space-size=2", "dist/src/main.js"]
CMD ["run", "--config", "/etc/polydev/polydev-reconciler.yaml"]
