# A one-shot job for docker-compose.yml: makes the cluster's CA and one
# certificate per node with `herald cert`, into /certs, only where they are
# missing (make-certs.sh). The herald image is FROM scratch and has no shell,
# so this small Debian image carries the same binary and the script.
#
#   docker build -f deploy/docker/certs.Dockerfile -t herald-certs:local deploy
#
# Build arguments:
#   HERALD_IMAGE  the herald image to take /herald from (default herald:local)
#   BASE_IMAGE    a Debian image: herald-debian-base:bookworm, made without a
#                 registry by deploy/docker/build-base.sh (the default), or
#                 debian:bookworm-slim where images can be pulled.

ARG HERALD_IMAGE=herald:local
ARG BASE_IMAGE=herald-debian-base:bookworm

FROM ${HERALD_IMAGE} AS herald

FROM ${BASE_IMAGE}
COPY --from=herald /herald /usr/local/bin/herald
COPY docker/make-certs.sh /usr/local/bin/make-certs
# The nodes run as 10001 and must read their keys (mode 0600): the job runs
# as the same user. /certs is owned by it, so a new named volume mounted
# there starts owned by it too.
RUN set -eux; \
    groupadd --gid 10001 herald; \
    useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin herald; \
    chmod 0755 /usr/local/bin/make-certs; \
    mkdir -p /certs; \
    chown 10001:10001 /certs; \
    herald --version
USER 10001:10001
VOLUME ["/certs"]
ENV CERTS_DIR=/certs \
    HERALD_NODES="n1 n2 n3"
ENTRYPOINT ["/usr/local/bin/make-certs"]
