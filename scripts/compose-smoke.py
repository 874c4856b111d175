#!/usr/bin/env python3
"""End-to-end check of the compose stack (docker-compose.yml), from the host.

Standard library only (no pip). With the stack up (`docker compose up -d`):

    scripts/compose-smoke.py

1. waits until every node's /readyz (127.0.0.1:7481-7483) is 200 and
   /v1/cluster lists the three nodes as ready;
2. waits until HAProxy (127.0.0.1:8404/stats) sees the three servers UP;
3. through HAProxy (127.0.0.1:7400): opens three WebSockets, subscribes on
   each, checks that HAProxy spread them over the nodes, publishes over HTTP
   (POST /v1/publish/{topic}) and over a WebSocket `pub`, and checks that
   each subscriber receives both messages, in order;
4. waits until Prometheus (127.0.0.1:9090) has the three herald targets up.

Ports are docker-compose.yml's defaults, or the same variables it reads
(LB_PORT, LB_STATS_PORT, PROMETHEUS_PORT, N1_ADMIN_PORT..N3_ADMIN_PORT).
Exits 0 when all of it holds, 1 otherwise, printing what it saw.
"""

import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.request

# The same variables as docker-compose.yml's published ports.
HOST = "127.0.0.1"
LB_PORT = int(os.environ.get("LB_PORT", "7400"))
STATS_PORT = int(os.environ.get("LB_STATS_PORT", "8404"))
PROM_PORT = int(os.environ.get("PROMETHEUS_PORT", "9090"))
ADMIN_PORTS = {
    "n1": int(os.environ.get("N1_ADMIN_PORT", "7481")),
    "n2": int(os.environ.get("N2_ADMIN_PORT", "7482")),
    "n3": int(os.environ.get("N3_ADMIN_PORT", "7483")),
}
TIMEOUT = float(os.environ.get("SMOKE_TIMEOUT", "90"))


def log(*args):
    print(*args, flush=True)


def http(method, url, body=None, headers=None, timeout=5):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(what, check, timeout=TIMEOUT, every=1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            ok, last = check()
            if ok:
                log(f"ok   {what}: {last}")
                return last
        except Exception as e:  # noqa: BLE001 - keep waiting, report the last error
            last = f"{type(e).__name__}: {e}"
        time.sleep(every)
    log(f"FAIL {what}: {last}")
    sys.exit(1)


class WebSocket:
    """A minimal RFC 6455 client: text frames, masked, pings answered."""

    def __init__(self, host, port, path="/ws", protocol="herald.v1.json"):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.buf = b""
        self.pending = []  # messages of the last frame not yet returned
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.response = head.decode()
        status = self.response.split("\r\n", 1)[0]
        if " 101 " not in status:
            raise ConnectionError(f"upgrade refused: {status}")

    def _send_frame(self, opcode, payload):
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_json(self, obj):
        self._send_frame(0x1, json.dumps(obj).encode())

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_messages(self, timeout=10):
        """The next text frame, as a list of message objects."""
        self.sock.settimeout(timeout)
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            payload = self._read(n)
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise ConnectionError(f"closed by the server, code {code}")
            elif opcode == 0x1:
                value = json.loads(payload)
                return value if isinstance(value, list) else [value]

    def wait_for(self, predicate, timeout=10):
        """The next message that matches; those before it are dropped. A
        frame may carry several messages: the rest wait for the next call."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                m = self.pending.pop(0)
                if predicate(m):
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching message")
            self.pending = self.recv_messages(timeout=left)

    def close(self):
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
            self.sock.settimeout(2)
            while True:  # until the server's close frame or EOF
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", self._read(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", self._read(8))
                self._read(n)
                if b0 & 0x0F == 0x8:
                    break
        except (OSError, ConnectionError):
            pass
        self.sock.close()


def node_connections(port):
    _, body = http("GET", f"http://{HOST}:{port}/metrics")
    for line in body.splitlines():
        if line.startswith("herald_connections "):
            return int(float(line.split()[1]))
    return 0


def check_nodes():
    states = {}
    for node, port in ADMIN_PORTS.items():
        status, body = http("GET", f"http://{HOST}:{port}/readyz")
        if status != 200:
            return False, f"{node} /readyz {status} {body}"
        cluster = json.loads(http("GET", f"http://{HOST}:{port}/v1/cluster")[1])
        states[node] = sorted(
            f"{m['node_id']}={m['state']}" for m in cluster["members"]
        )
    want = ["n1=ready", "n2=ready", "n3=ready"]
    return all(s == want for s in states.values()), states


def check_haproxy():
    status, body = http("GET", f"http://{HOST}:{STATS_PORT}/stats;csv")
    servers = {}
    for line in body.splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "herald_nodes" and fields[1] in ADMIN_PORTS:
            servers[fields[1]] = fields[17]
    return status == 200 and sorted(servers.values()) == ["UP"] * 3, servers


def check_prometheus():
    status, body = http("GET", f"http://{HOST}:{PROM_PORT}/api/v1/targets?state=active")
    targets = json.loads(body)["data"]["activeTargets"]
    herald = {
        t["labels"].get("node", t["labels"]["instance"]): t["health"]
        for t in targets
        if t["labels"]["job"] == "herald"
    }
    others = {t["labels"]["job"]: t["health"] for t in targets if t["labels"]["job"] != "herald"}
    ok = status == 200 and sorted(herald) == ["n1", "n2", "n3"] and set(herald.values()) == {"up"}
    return ok, {"herald": herald, **others}


def main():
    wait_for("nodes ready, cluster of 3", check_nodes)
    wait_for("haproxy backends", check_haproxy)

    topic = f"smoke.compose.{os.getpid()}"
    subscribers = [WebSocket(HOST, LB_PORT) for _ in range(3)]
    log(f"ok   3 WebSockets through HAProxy: {subscribers[0].response.splitlines()[0]}")
    for i, ws in enumerate(subscribers):
        ws.send_json({"op": "sub", "id": 1, "topic": topic})
        ok = ws.wait_for(lambda m: m.get("op") in ("ok", "err") and m.get("id") == 1)
        if ok.get("op") != "ok":
            log(f"FAIL sub on socket {i}: {ok}")
            sys.exit(1)
    log(f"ok   subscribed to {topic} on each: {ok}")
    # leastconn spreads the sockets over the nodes: delivery crosses nodes.
    spread = {node: node_connections(port) for node, port in ADMIN_PORTS.items()}
    if sum(1 for n in spread.values() if n > 0) < 2:
        log(f"FAIL WebSockets not spread over the nodes: herald_connections {spread}")
        sys.exit(1)
    log(f"ok   WebSockets spread by HAProxy, herald_connections per node: {spread}")

    status, body = http(
        "POST",
        f"http://{HOST}:{LB_PORT}/v1/publish/{topic}",
        body=json.dumps({"hello": "over http"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    if status != 200:
        log(f"FAIL HTTP publish through HAProxy: {status} {body}")
        sys.exit(1)
    log(f"ok   POST /v1/publish/{topic} through HAProxy: {status} {body}")

    publisher = subscribers[0]
    publisher.send_json({"op": "pub", "id": 2, "topic": topic, "data": "over ws"})

    for i, ws in enumerate(subscribers):
        got = []
        while len(got) < 2:
            m = ws.wait_for(lambda m: m.get("op") == "msg" and m.get("topic") == topic)
            got.append(m)
        datas = [m["data"] for m in got]
        if datas != [{"hello": "over http"}, "over ws"]:
            log(f"FAIL socket {i} received {got}")
            sys.exit(1)
        log(f"ok   socket {i} received: {json.dumps(got)}")
    for ws in subscribers:
        ws.close()

    wait_for("prometheus targets", check_prometheus)
    log("smoke: all checks passed")


if __name__ == "__main__":
    main()
