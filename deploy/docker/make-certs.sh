#!/bin/sh
# Makes the cluster CA and the node certificates with `herald cert`, keeping
# whatever already exists, so that `docker compose up` can run it every time
# (a new CA would orphan the certificates of nodes that are still running).
#
# Environment:
#   CERTS_DIR     where to write (default /certs)
#   HERALD_NODES  node ids, space- or comma-separated (default "n1 n2 n3");
#                 each node's id is also its compose service name, which the
#                 certificate names as a DNS name
#   EXTRA_SANS    more DNS names or IP addresses for every node certificate,
#                 comma-separated (optional)
set -eu

dir=${CERTS_DIR:-/certs}
nodes=$(printf '%s' "${HERALD_NODES:-n1 n2 n3}" | tr ',' ' ')

if [ -f "$dir/ca.pem" ] && [ -f "$dir/ca-key.pem" ]; then
  echo "make-certs: keeping the CA in $dir"
elif [ -e "$dir/ca.pem" ] || [ -e "$dir/ca-key.pem" ]; then
  echo "make-certs: $dir holds half a CA (ca.pem or ca-key.pem alone): remove the volume and start again" >&2
  exit 1
else
  herald cert ca --out "$dir"
fi

for node in $nodes; do
  if [ -f "$dir/$node.pem" ] && [ -f "$dir/$node-key.pem" ]; then
    echo "make-certs: keeping the certificate of $node"
    continue
  fi
  set -- --san "$node"
  if [ -n "${EXTRA_SANS:-}" ]; then
    for san in $(printf '%s' "$EXTRA_SANS" | tr ',' ' '); do
      set -- "$@" --san "$san"
    done
  fi
  herald cert node --ca "$dir" --name "$node" --out "$dir" "$@"
done
ls -ln "$dir"
