"""A live explore server in a thread, for the API and browser tests."""

import socket
import threading
import time

import pytest


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port until :meth:`stop`."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the explore server did not start within 20 s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server():
    """``start(app) -> LiveServer``; every server started is stopped after the test."""
    servers = []

    def start(app):
        servers.append(LiveServer(app))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()
