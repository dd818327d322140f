"""`python -m services.run_worker`: the worker process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence

import grpc

from services.run_worker.metrics import WorkerMetrics
from services.run_worker.tools import Tool, UnknownTools, registry
from services.run_worker.worker import ONCE_DEADLINE_SECONDS, Worker
from shared.logs import configure_logging
from shared.settings import SettingsError, WorkerSettings, parse_tools
from shared.telemetry import configure_tracing


def _tool_list(raw: str) -> tuple[str, ...]:
    try:
        return parse_tools(raw)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: Sequence[str] | None, defaults: WorkerSettings) -> argparse.Namespace:
    """Flags override the environment."""
    p = argparse.ArgumentParser(
        prog="python -m services.run_worker",
        description="Run worker: claims queued runs from the run API and executes them.",
    )
    p.add_argument("--api-addr", default=defaults.api_addr, help="API address (RUN_API_ADDR) [%(default)s]")
    p.add_argument("--worker-id", default=defaults.worker_id, help="worker id (RUN_WORKER_ID) [host-pid-random]")
    p.add_argument("--workspace-id", default=defaults.workspace_id,
                   help="workspace to claim from (RUN_WORKER_WORKSPACE_ID) [%(default)s]")
    p.add_argument("--concurrency", type=int, default=defaults.concurrency,
                   help="runs executed at once (RUN_WORKER_CONCURRENCY) [%(default)s]")
    p.add_argument("--batch-limit", type=int, default=defaults.batch_limit,
                   help="runs per claim (RUN_WORKER_BATCH_LIMIT) [%(default)s]")
    p.add_argument("--poll-ms", type=int, default=defaults.poll_ms,
                   help="fallback poll interval when no notification arrives (RUN_WORKER_POLL_MS) [%(default)s]")
    p.add_argument("--heartbeat-seconds", type=float, default=defaults.heartbeat_seconds,
                   help="heartbeat interval (RUN_HEARTBEAT_SECONDS) [a third of RUN_LEASE_SECONDS]")
    p.add_argument("--drain-seconds", type=float, default=defaults.drain_seconds,
                   help="on SIGTERM or Ctrl-C, how long held runs may finish; a second one releases them at once "
                        "(RUN_WORKER_DRAIN_SECONDS) [%(default)s]")
    p.add_argument("--tools", type=_tool_list, default=defaults.tools,
                   help="tools this worker runs, comma-separated: stock ones or from the runs.tools entry points; "
                        f"shell runs commands on this host (RUN_WORKER_TOOLS) [{','.join(defaults.tools)}]")
    p.add_argument("--tls-ca", default=defaults.tls.ca,
                   help="CA certificate (PEM) to trust for a TLS API (RUNS_TLS_CA); the key comes from RUNS_API_KEY")
    p.add_argument("--once", action="store_true",
                   help="claim one batch, execute it, print counters as one JSON line, and exit")
    # Internal: make up's API passes a pipe; the worker writes a line to it once its claim stream opens.
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _tell_ready(fd: int) -> None:
    with contextlib.suppress(OSError):  # the API stopped waiting: nothing to tell
        os.write(fd, b"connected\n")
    with contextlib.suppress(OSError):
        os.close(fd)


async def _main(settings: WorkerSettings, once: bool, tools: dict[str, Tool], ready_fd: int | None = None) -> int:
    metrics = WorkerMetrics() if settings.metrics_addr else None
    if metrics is not None:
        metrics.serve(settings.metrics_addr)  # OSError (address taken): the process fails at start
    worker = Worker(settings, tools, metrics)
    try:
        if once:
            counters = await worker.run_cycle()
            out = {k: counters.get(k, 0) for k in ("claimed", "succeeded", "failed", "canceled")}
            print(json.dumps(out), flush=True)
            return 0
        stop = asyncio.Event()

        def on_signal() -> None:  # the first stops claiming and drains; the second releases the held runs
            if stop.is_set():
                worker.release_now.set()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if ready_fd is not None:
            worker.on_connected = lambda: _tell_ready(ready_fd)
        await worker.run(stop)
        return 0
    finally:
        await worker.close()
        if metrics is not None:
            metrics.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    try:
        env = WorkerSettings.from_env()
        args = parse_args(argv, env)
        settings = dataclasses.replace(
            env,
            api_addr=args.api_addr,
            worker_id=args.worker_id,
            workspace_id=args.workspace_id,
            concurrency=args.concurrency,
            batch_limit=args.batch_limit,
            poll_ms=args.poll_ms,
            heartbeat_seconds=args.heartbeat_seconds,
            drain_seconds=args.drain_seconds,
            tools=args.tools,
            tls=dataclasses.replace(env.tls, ca=args.tls_ca),
        )
        tools = registry(settings.tools)  # an unknown or broken tool fails here, naming the known ones
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except UnknownTools as err:
        print(f"error: RUN_WORKER_TOOLS (--tools): {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log, actor="worker")
    configure_tracing("runs-worker")
    try:
        return asyncio.run(_main(settings, args.once, tools, args.ready_fd))
    except KeyboardInterrupt:
        return 130
    except grpc.aio.AioRpcError as err:  # --once: the API is down; else it refused us (bad flags, no or a bad key)
        from services.cli.common import describe_rpc_error  # the CLI's words and exit codes, on this path only

        lines, code = describe_rpc_error(err, settings.api_addr, ONCE_DEADLINE_SECONDS,
                                         has_key=bool(settings.api_key), tls=settings.tls)
        print("\n".join(lines), file=sys.stderr)
        return code
    except Exception as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
