"""A TCP proxy on 127.0.0.1 that can take its upstream "down" on request.

    python -m tests.e2e.tcp_proxy LISTEN_PORT UPSTREAM_HOST:UPSTREAM_PORT CONTROL_FILE

It forwards every connection to the upstream. When CONTROL_FILE appears, holding a
number of seconds, the proxy drops every open connection and refuses new ones for that
long (the endpoint is down, as far as clients can tell), then deletes the file and
forwards again. Anyone who can write the file can cut the link: the fault suite's
workers do it at a chosen step. Stopped by PID.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import threading
import time


class Proxy:
    def __init__(self, port: int, upstream: tuple[str, int], control: str):
        self.upstream, self.control = upstream, control
        self.listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.down_until = 0.0
        self.outages = 0

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                with self.lock:
                    self.conns.discard(s)
                try:
                    s.close()
                except OSError:
                    pass

    def _accept_loop(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if time.monotonic() < self.down_until:
                # Refuse: reset at once, as a dead endpoint behind a load balancer would.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns |= {client, up}
            threading.Thread(target=self._pipe, args=(client, up), daemon=True).start()

    def _watch_control(self) -> None:
        while True:
            time.sleep(0.05)
            if not os.path.exists(self.control):
                continue
            try:
                seconds = float(open(self.control).read().strip() or "0")
            except (OSError, ValueError):
                continue
            self.outages += 1
            self.down_until = time.monotonic() + seconds
            print(f"[proxy] down for {seconds:g} s (outage {self.outages})", flush=True)
            with self.lock:
                for s in list(self.conns):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            while time.monotonic() < self.down_until:
                time.sleep(0.05)
            os.remove(self.control)
            print("[proxy] up again", flush=True)

    def serve(self) -> None:
        threading.Thread(target=self._watch_control, daemon=True).start()
        self._accept_loop()


def main(argv: list[str]) -> None:
    port, upstream, control = int(argv[0]), argv[1], argv[2]
    host, up_port = upstream.rsplit(":", 1)
    Proxy(port, (host, int(up_port)), control).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
