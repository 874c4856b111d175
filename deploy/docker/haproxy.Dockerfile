# HAProxy from Debian's package, for docker-compose.yml: the load balancer
# in front of the Herald nodes' client ports (deploy/haproxy/haproxy.cfg).
#
#   docker build -f deploy/docker/haproxy.Dockerfile -t herald-haproxy:local deploy
#
# BASE_IMAGE: herald-debian-base:bookworm, made without a registry by
# deploy/docker/build-base.sh (the default), or debian:bookworm-slim where
# images can be pulled.

ARG BASE_IMAGE=herald-debian-base:bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends haproxy; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    haproxy -v
COPY haproxy/haproxy.cfg /etc/haproxy/haproxy.cfg
RUN haproxy -c -f /etc/haproxy/haproxy.cfg
# The package's own user; every port used is above 1024.
USER haproxy
WORKDIR /var/lib/haproxy
EXPOSE 7400/tcp 8404/tcp
# No curl here: bash's /dev/tcp asks the monitor URI on the stats port.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8404 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# -W: master-worker (a reload is `docker compose kill -s SIGUSR2 haproxy`);
# -db: stay in the foreground.
CMD ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
