"""The benchmark's yardstick: the smallest Quart-trio app, served like the agent.

`python -m tests.bench.trivial_app --port N` serves `GET /ping` (a small JSON
body) with the agent's server set-up: one process, Hypercorn's trio worker, the
same Hypercorn configuration (defaults, no access log). Whatever rate it
reaches on a machine is the ceiling for any Quart-trio app there, so the agent's
request rate is reported as a fraction of it. Exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response
from quart_trio import QuartTrio

_PING_BODY = json.dumps({"status": "ok", "service": "trivial"}, separators=(",", ":"))


def create_app() -> QuartTrio:
    app = QuartTrio("trivial")

    @app.get("/ping")
    async def ping() -> Response:
        # Built per request, as the agent's json_response does.
        return Response(_PING_BODY, status=200, content_type="application/json")

    return app


def hypercorn_config(bind: str, port: int) -> HypercornConfig:
    """The agent's Hypercorn settings (agent/app.py), less the address."""
    config = HypercornConfig()
    config.bind = [f"{bind}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 10.0
    return config


async def _serve(bind: str, port: int) -> None:
    shutdown = trio.Event()

    async def wait_for_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                shutdown.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_signal)
        await serve(create_app(), hypercorn_config(bind, port), shutdown_trigger=shutdown.wait)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trio.run(_serve, args.bind, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
