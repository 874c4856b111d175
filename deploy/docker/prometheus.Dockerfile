# Prometheus from Debian's package, for docker-compose.yml: scrapes the
# Herald nodes' /metrics (deploy/prometheus/prometheus.yml).
#
#   docker build -f deploy/docker/prometheus.Dockerfile -t herald-prometheus:local deploy
#
# BASE_IMAGE: herald-debian-base:bookworm, made without a registry by
# deploy/docker/build-base.sh (the default), or debian:bookworm-slim where
# images can be pulled.

ARG BASE_IMAGE=herald-debian-base:bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends prometheus; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    # The web UI loads moment-timezone-with-data.min.js; the package's 200 MB
    # of source time-zone data beside it are never served.
    rm -rf /usr/share/javascript/moment-timezone/data; \
    mkdir -p /var/lib/prometheus/metrics2; \
    chown -R prometheus:prometheus /var/lib/prometheus; \
    prometheus --version
COPY prometheus/prometheus.yml /etc/prometheus/prometheus.yml
RUN promtool check config /etc/prometheus/prometheus.yml
USER prometheus
WORKDIR /var/lib/prometheus
EXPOSE 9090/tcp
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/healthy HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", \
     "--storage.tsdb.path=/var/lib/prometheus/metrics2", \
     "--storage.tsdb.retention.time=2d", \
     "--web.listen-address=:9090", \
     "--web.enable-lifecycle"]
