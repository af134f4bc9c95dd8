"""A picochat app served by uvicorn in a background thread: for tests, benchmarks and notebooks that need a real
socket (`picochat serve` itself runs uvicorn in the foreground)."""
import socket
import threading
import time

import uvicorn

from picochat.http_guard import H11_MAX_EVENT_BYTES


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, notebooks): `with ServerThread(app) as srv:`,
    then talk to srv.url. port=0 picks a free port; the socket is bound here, so there is no race for it."""
    def __init__(self, app, host="127.0.0.1", port=0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        # h11 with the header limit `picochat serve` uses, so header-size behaviour is the real one
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", http="h11",
                                                    h11_max_incomplete_event_size=H11_MAX_EVENT_BYTES))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
