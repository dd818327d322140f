"""`python -m services.run_api [serve|migrate|replay|keys|archive]`: the run API process and its admin commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import sqlalchemy.exc

from services.run_api import auth, db
from services.run_api.server import ApiServer, ListenError
from services.run_api.store import events
from shared.logs import configure_logging
from shared.settings import STOCK_TOOLS, ApiSettings, SettingsError, WorkerSettings
from shared.telemetry import configure_tracing

log = logging.getLogger("services.run_api")


def parse_args(argv: Sequence[str] | None, defaults: ApiSettings) -> argparse.Namespace:
    """Flags override the environment."""
    p = argparse.ArgumentParser(
        prog="python -m services.run_api",
        description="Run API: serves runs.v1.RunService and runs.v1.WorkerService over gRPC.",
    )
    p.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate", "replay"],
                   help="serve (default); migrate: apply migrations and exit; "
                        "replay: rebuild workflows/runs/run_steps/tool_calls/run_artifacts from the logs and exit; "
                        "see also `keys create --help` and `archive --help`")
    p.add_argument("--addr", default=defaults.addr, help="listen address (RUN_API_ADDR) [%(default)s]")
    p.add_argument("--database-url", default=defaults.database_url,
                   help="PostgreSQL URL (DATABASE_URL) [embedded PostgreSQL in --data-dir]")
    p.add_argument("--data-dir", default=defaults.data_dir,
                   help="where the embedded PostgreSQL keeps its data (RUNS_DATA_DIR) [%(default)s]")
    p.add_argument("--no-migrate", action="store_true", default=not defaults.migrate_on_start,
                   help="do not migrate on start (RUN_API_MIGRATE=false)")
    p.add_argument("--lease-seconds", type=float, default=defaults.lease_seconds,
                   help="lease of a claim (RUN_LEASE_SECONDS) [%(default)s]")
    p.add_argument("--embedded-worker", action="store_true", default=defaults.embedded_worker,
                   help="also run a worker loop in this process (RUN_WORKER_EMBEDDED)")
    p.add_argument("--with-worker", action="store_true",
                   help="start one worker process beside the API and stop it with the API (make up)")
    p.add_argument("--processes", type=int, default=defaults.processes,
                   help="API processes serving the one port with SO_REUSEPORT (RUN_API_PROCESSES) [%(default)s]")
    # Internal: how the parent of RUN_API_PROCESSES > 1 starts each of its API processes.
    p.add_argument("--child-of", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


async def _migrate_when_reachable(url: str, timeout: float = 60.0) -> None:
    """Migrate, retrying while the database cannot be reached (it may still be starting)."""
    deadline = asyncio.get_running_loop().time() + timeout
    delay = 0.5
    while True:
        try:
            await asyncio.to_thread(db.migrate, url)
            return
        except sqlalchemy.exc.OperationalError as err:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("database not reachable for migrations (%s); retrying in %.1fs", type(err.orig).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class LocalWorker:
    """The --with-worker worker process (make up), connected to the API's port.

    It writes a line to the pipe `ready` once its claim stream is open: then the API prints the
    ready banner. Ctrl-C reaches the API only (the worker has its own session); the API stops the
    worker first (SIGTERM: it drains), and a second Ctrl-C sends it a second SIGTERM (it releases
    its runs at once).
    """

    def __init__(self, settings: ApiSettings, port: int) -> None:
        host = settings.addr.rsplit(":", 1)[0]
        env = {**os.environ, "RUN_API_ADDR": f"{host}:{port}"}
        if not env.get("RUN_WORKER_TOOLS", "").strip() and auth.is_loopback(settings.addr):
            # A local development worker: shell is opt-in elsewhere, allowed here unless told otherwise.
            env["RUN_WORKER_TOOLS"] = ",".join(STOCK_TOOLS)
            log.info("the local worker allows the shell tool (RUN_WORKER_TOOLS=%s)", env["RUN_WORKER_TOOLS"])
        self.settings, self.addr = settings, f"{host}:{port}"
        self.ready, ready_w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.run_worker", "--ready-fd", str(ready_w)],
                                         env=env, start_new_session=True, pass_fds=(ready_w,))
        except BaseException:
            os.close(self.ready)
            raise
        finally:
            os.close(ready_w)
        self.signals = 0
        try:  # what the worker will run, with its defaults (RUN_WORKER_TOOLS unset: the stock default)
            worker_settings = WorkerSettings.from_env(env)
            self.tools, self.drain_seconds = tuple(worker_settings.tools), worker_settings.drain_seconds
        except (ValueError, SettingsError):  # the worker says what is wrong and exits
            self.tools, self.drain_seconds = (), 0.0
        log.info("started worker process pid %d", self.proc.pid)

    def read_ready(self) -> bool:
        """Read the worker's line (call when `ready` is readable): True if it connected, False if it exited."""
        connected = bool(os.read(self.ready, 64))
        os.close(self.ready)
        self.ready = -1
        if not connected:
            try:
                how = f"exited with {_exit_code(self.proc.wait(5))}"
            except subprocess.TimeoutExpired:  # it closed the pipe yet runs: it will say what went wrong
                how = "gave up on telling the API it connected"
            log.error("the worker %s before it connected; the API serves without it", how)
        return connected

    def banner(self, http_url: str | None, auth_required: bool) -> str:
        """What make up prints once the API and its worker are up."""
        from services.cli.common import DEFAULT_ADDR  # where `runs` connects without --addr

        cli = _runs_command()
        if self.addr != DEFAULT_ADDR:
            cli = f"{cli} --addr {self.addr}"
        if "shell" in self.tools:
            try_it = (f"{cli} start --workflow campaign.build "
                      """--input '{"product": "Acme Rockets", "audience": "coyotes"}' --wait""")
        else:
            try_it = f"{cli} start --wait"
        lines = [
            "",
            f"Runs is ready: the API on {self.addr} and one worker (pid {self.proc.pid}, tools: "
            f"{', '.join(sorted(self.tools))}).",
            f"  dashboard  {http_url}/" if http_url else "  dashboard  off (set RUN_API_HTTP_ADDR to serve it)",
            f"  try        {try_it}",
        ]
        if auth_required:
            lines.append("  keys       auth is required: set RUNS_API_KEY "
                         "(python -m services.run_api keys create --help)")
        lines += [
            f"  stop       Ctrl-C: runs in progress get up to {self.drain_seconds:g}s to finish "
            "(RUN_WORKER_DRAIN_SECONDS); Ctrl-C again gives them back to the queue at once",
            "",
        ]
        return "\n".join(lines)

    def on_signal(self) -> None:
        """Ctrl-C or SIGTERM to the API: the second and later ones are passed on, so the worker releases its runs."""
        self.signals += 1
        if self.signals >= 2 and self.proc.poll() is None:
            log.info("stopping again: the worker releases its runs now")
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM the worker and wait for it (it drains while the API still serves it)."""
        if self.ready >= 0:
            os.close(self.ready)
            self.ready = -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()


def _runs_command() -> str:
    """How to call this installation's `runs` from here: .venv/bin/runs in a checkout (else its full path, or runs)."""
    runs = pathlib.Path(sys.executable).parent / "runs"
    if not runs.exists():
        return "runs"
    relative = os.path.relpath(runs)
    return str(runs) if relative.startswith("..") else relative


def _http_url(addr: str, port: int | str) -> str:
    host = addr.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


async def _announce(worker: LocalWorker, server: ApiServer) -> None:
    """Print the banner once the worker's claim stream is open."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(worker.ready, readable.set_result, None)
    try:
        await readable
    finally:
        loop.remove_reader(worker.ready)
    if worker.read_ready():
        http = server.http_servers.get("RUN_API_HTTP_ADDR")
        banner = worker.banner(_http_url(http[1], http[0].port) if http else None, server.auth_mode == "required")
        print(banner, file=sys.stderr, flush=True)


async def _serve(settings: ApiSettings, url: str, with_worker: bool, ready_fd: int | None = None) -> int:
    if settings.migrate_on_start:
        await _migrate_when_reachable(url)
    server = ApiServer(settings, url, reuse_port=ready_fd is not None)
    stop = asyncio.Event()
    worker: LocalWorker | None = None

    def on_signal() -> None:
        if stop.is_set() and settings.embedded_worker:  # a second one: the embedded worker releases its runs
            from services.run_worker.embedded import release_held_runs

            release_held_runs()
        stop.set()
        if worker is not None:
            worker.on_signal()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    port = await server.start()
    if ready_fd is not None:  # one of RUN_API_PROCESSES: tell the parent this process serves
        os.write(ready_fd, f"{os.getpid()}\n".encode())
        os.close(ready_fd)
    announce: asyncio.Task[None] | None = None
    if with_worker:
        worker = LocalWorker(settings, port)
        announce = asyncio.create_task(_announce(worker, server), name="banner")
    try:
        await server.wait(stop)
    finally:
        if announce is not None:
            announce.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announce
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await server.stop()
    return 1 if server.failed else 0


# --- RUN_API_PROCESSES > 1: a parent and its API processes on one port ------------------------


def _reserve_port(addr: str, name: str = "") -> tuple[socket.socket, int]:
    """Check that the port of `addr` is free and hold it for the API processes; port 0 picks one.

    The socket held is bound with SO_REUSEPORT but never listens, so the kernel hands it no
    connection; it keeps the port from anyone but processes that also set SO_REUSEPORT.
    """
    host, _, port_text = addr.rpartition(":")
    where = f"{addr} ({name})" if name else addr
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port_text), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, ValueError) as err:
        raise ListenError(f"cannot listen on {where}: {err}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:  # without SO_REUSEPORT: taken means taken
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError:
            raise ListenError(f"cannot listen on {where}: is another process using it?") from None
        port = int(probe.getsockname()[1])
    hold = socket.socket(family, kind, proto)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        hold.bind((sockaddr[0], port, *sockaddr[2:]))
    except OSError as err:
        hold.close()
        raise ListenError(f"cannot listen on {where}: {err.strerror}") from None
    return hold, port


def _die_with_parent(parent_pid: int) -> bool:
    """An API process of a group gets SIGTERM when its parent dies, even by SIGKILL; False if it is gone already."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    return os.getppid() == parent_pid


def _exit_code(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


class ApiProcesses:
    """The parent of RUN_API_PROCESSES API processes serving one port (SO_REUSEPORT).

    It resolves the database and migrates once, then starts each process with
    `--no-migrate` and DATABASE_URL set, and the --with-worker worker once all of them serve.
    SIGTERM or SIGINT to the parent stops the worker, then every process (SIGTERM, in their own
    process groups so a terminal's Ctrl-C reaches the parent only). Fail-fast: a process
    that exits unasked stops the others and the parent exits non-zero, as one API process does
    when one of its background loops dies. Restarting is the job of what runs the API (systemd,
    Kubernetes, compose), which sees one unit; a parent that restarted children itself would hide
    a crash loop from it.
    """

    def __init__(self, settings: ApiSettings, url: str, with_worker: bool) -> None:
        self.settings, self.url, self.with_worker = settings, url, with_worker
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.signals = 0  # SIGTERM/SIGINT received: the second is passed on to the processes (release now)
        self.worker: LocalWorker | None = None

    def _command(self, index: int, ready_fd: int) -> list[str]:
        return [sys.executable, "-m", "services.run_api", "serve", "--child-of", str(os.getpid()),
                "--child-index", str(index), "--ready-fd", str(ready_fd)]

    def _env(self, addr: str, http_env: dict[str, str]) -> dict[str, str]:
        """Each process's settings: the parent's (flags included) as environment, the URL kept off argv."""
        s = self.settings
        return {**os.environ, "RUN_API_PROCESSES": "1", "RUN_API_ADDR": addr, "DATABASE_URL": self.url,
                "RUN_API_HTTP_ADDR": "", "RUN_API_METRICS_ADDR": "", **http_env,
                "RUNS_DATA_DIR": s.data_dir, "RUN_API_MIGRATE": "false", "RUN_LEASE_SECONDS": repr(s.lease_seconds),
                "RUN_WORKER_EMBEDDED": "true" if s.embedded_worker else "false"}

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or until a process exits unasked; the exit code."""
        if not sys.platform.startswith("linux"):
            raise ListenError("RUN_API_PROCESSES above 1 needs Linux (SO_REUSEPORT spreads connections there)")
        if self.settings.migrate_on_start:
            asyncio.run(_migrate_when_reachable(self.url))
        hold, port = _reserve_port(self.settings.addr)
        addr = f"{self.settings.addr.rsplit(':', 1)[0]}:{port}"
        # The HTTP ports too: held here, so the group's processes share each with each other only (and port 0
        # becomes one port for all of them).
        holds, http_env = [hold], {}
        for variable, wanted in (("RUN_API_HTTP_ADDR", self.settings.http_addr),
                                 ("RUN_API_METRICS_ADDR", self.settings.metrics_addr)):
            if wanted:
                try:
                    held, held_port = _reserve_port(wanted, variable)
                except ListenError:
                    for one in holds:
                        one.close()
                    raise
                holds.append(held)
                http_env[variable] = f"{wanted.rsplit(':', 1)[0]}:{held_port}"
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        # The handlers wake select() (the wakeup fd); a second stop signal also goes on to the worker.
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
        previous_fd = signal.set_wakeup_fd(wake_w)
        try:
            code = self._supervise(addr, http_env, port, wake_r)
        finally:
            self._stop_all()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (wake_r, wake_w):
                os.close(fd)
            for one in holds:
                one.close()
        if code == 0 and not self.clean:
            log.error("API processes did not stop cleanly: %s",
                      ", ".join(f"pid {p}: {_exit_code(c.returncode)}" for p, c in self.children.items()))
            return 1
        return code

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.worker is not None:
            self.worker.on_signal()
        if self.signals >= 2:  # the processes' embedded workers (RUN_WORKER_EMBEDDED) release their runs now
            for child in self.children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    def _supervise(self, addr: str, http_env: dict[str, str], port: int, wake_r: int) -> int:
        ready_r, ready_w = os.pipe()
        try:
            env = self._env(addr, http_env)
            for index in range(1, self.settings.processes + 1):
                # A process group of its own: Ctrl-C reaches the parent only, which stops the worker first.
                child = subprocess.Popen(self._command(index, ready_w), env=env, pass_fds=(ready_w,), process_group=0)
                self.children[child.pid] = child
            os.close(ready_w)
            ready_w = -1
            starting, pending, ready_open = set(self.children), b"", True
            while True:
                banner = [self.worker.ready] if self.worker is not None and self.worker.ready >= 0 else []
                readable, _, _ = select.select([wake_r, *([ready_r] if ready_open else []), *banner], [], [])
                if wake_r in readable:
                    signals = os.read(wake_r, 1024)
                    if signal.SIGTERM in signals or signal.SIGINT in signals:
                        log.info("stopping %d API processes", len(self.children))
                        return 0
                for pid, child in self.children.items():
                    if (code := child.poll()) is not None:
                        log.error("API process pid %d exited unexpectedly with %s; stopping the others",
                                  pid, _exit_code(code))
                        return code if code > 0 else 1
                if banner and banner[0] in readable and self.worker is not None and self.worker.read_ready():
                    http = http_env.get("RUN_API_HTTP_ADDR")
                    required = auth.resolve_mode(self.settings.auth, addr, self.settings.http_addr) == "required"
                    print(self.worker.banner(_http_url(http, http.rsplit(":", 1)[1]) if http else None, required),
                          file=sys.stderr, flush=True)
                if ready_r in readable:
                    chunk = os.read(ready_r, 1024)
                    ready_open = bool(chunk)  # at its end once every process has written (or died)
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    was_starting = bool(starting)
                    starting -= {int(line) for line in lines if line.strip()}
                    if was_starting and not starting:
                        log.info("run API listening on %s with %d processes (pids %s)", addr, len(self.children),
                                 " ".join(map(str, self.children)))
                        if self.with_worker:
                            self.worker = LocalWorker(self.settings, port)
        finally:
            for fd in (ready_r, ready_w):
                if fd >= 0:
                    os.close(fd)

    def _stop_all(self) -> None:
        """Stop the worker first (it drains while the API serves it), then every API process."""
        if self.worker is not None:
            self.worker.stop()
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = self.settings.shutdown_grace_seconds * 2 + 30
        if self.settings.embedded_worker:  # each process's embedded worker drains first
            with contextlib.suppress(ValueError, SettingsError):
                deadline += WorkerSettings.from_env().drain_seconds
        for pid, child in self.children.items():
            try:
                child.wait(deadline)
            except subprocess.TimeoutExpired:
                log.error("API process pid %d did not stop within %.0fs; killing it", pid, deadline)
                child.kill()
                child.wait()

    @property
    def clean(self) -> bool:
        """Whether every process ended by itself with code 0 (or by the SIGTERM it was sent)."""
        return all(c.returncode in (0, -signal.SIGTERM) for c in self.children.values())


async def _replay(url: str) -> int:
    engine = db.make_engine(url, 2)
    try:
        async with engine.begin() as conn:
            count = await events.replay(conn)
    finally:
        await engine.dispose()
    print(f"replayed {count} events into workflows, runs, run_steps, tool_calls and run_artifacts")
    return 0


def parse_keys_args(argv: Sequence[str]) -> argparse.Namespace:
    """`keys create ...`: make a key straight in the database, on the API host (the first admin key)."""
    p = argparse.ArgumentParser(
        prog="python -m services.run_api keys",
        description="Create an API key directly in the database (for the first admin key of a deployment or "
                    "of a new tenant). Other keys: `runs keys create` with an admin key.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a key and print its secret once")
    create.add_argument("--role", required=True, choices=auth.ROLES)
    create.add_argument("--tenant", default=auth.DEFAULT_TENANT, help="tenant of the key [%(default)s]")
    create.add_argument("--project", default="", help="limit the key to one project")
    create.add_argument("--workspace", default="", help="limit the key to one workspace")
    create.add_argument("--ttl", type=int, default=0, help="seconds until it expires (0: never) [%(default)s]")
    create.add_argument("--description", default="")
    create.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or None,
                        help="PostgreSQL URL (DATABASE_URL) [embedded PostgreSQL in --data-dir]")
    create.add_argument("--data-dir", default=os.environ.get("RUNS_DATA_DIR") or ".runs")
    return p.parse_args(argv)


async def _create_key(url: str, args: argparse.Namespace) -> tuple[object, str]:
    from services.run_api.handlers import utcnow
    from services.run_api.store.uow import UnitOfWork

    engine = db.make_engine(url, 2)
    try:
        cmd = auth.CreateKey(role=args.role, tenant_id=args.tenant, project_id=args.project,
                             workspace_id=args.workspace, ttl_seconds=args.ttl, description=args.description)
        async with UnitOfWork(engine) as uow:
            return await auth.create_key(uow, cmd, auth.Caller.anonymous(), utcnow())
    finally:
        await engine.dispose()


def keys_main(argv: Sequence[str]) -> int:
    """`python -m services.run_api keys create --role admin`: prints the new key's id and secret."""
    from services.run_api.errors import RunsError

    args = parse_keys_args(argv)
    try:
        url = db.resolve_database_url(args.database_url, args.data_dir)
        db.migrate(url)
        row, secret = asyncio.run(_create_key(url, args))
    except RunsError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except sqlalchemy.exc.OperationalError as err:
        print(f"error: cannot reach the database: {err.orig}", file=sys.stderr)
        return 1
    print(f"key id:  {row.key_id}")  # type: ignore[attr-defined]
    print(f"role:    {row.role}  tenant: {row.tenant_id}")  # type: ignore[attr-defined]
    print(f"secret:  {secret}")
    print("The secret is not stored and will not be shown again. Send it as 'authorization: Bearer <secret>' "
          "(RUNS_API_KEY for the runs CLI and workers).")
    return 0


def parse_archive_args(argv: Sequence[str]) -> argparse.Namespace:
    """`archive --finished-before 90d ...`: move old finished runs out of the database."""
    p = argparse.ArgumentParser(
        prog="python -m services.run_api archive",
        description="Write finished runs (SUCCEEDED, FAILED, CANCELED) that ended before a cutoff to gzipped JSON "
                    "lines files (run row, events, steps, tool calls, artifact rows), then delete them from the "
                    "database, a batch per file and per transaction. Runs a step_cache entry or an unfinished "
                    "rebuild points to are kept.",
    )
    p.add_argument("--finished-before", required=True, metavar="WHEN",
                   help="cutoff: Nd (days ago, e.g. 90d) or an ISO 8601 date or time (UTC unless stated)")
    p.add_argument("--to", default="", metavar="URL",
                   help="where the files go, any fsspec URL (file path, s3://...) [<data dir>/archive]")
    p.add_argument("--batch", type=int, default=1000, help="runs per file and per transaction [%(default)s]")
    p.add_argument("--dry-run", action="store_true", help="count what would be archived; change nothing")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or None,
                   help="PostgreSQL URL (DATABASE_URL) [embedded PostgreSQL in --data-dir]")
    p.add_argument("--data-dir", default=os.environ.get("RUNS_DATA_DIR") or ".runs")
    return p.parse_args(argv)


def archive_main(argv: Sequence[str]) -> int:
    """`python -m services.run_api archive`: prints what was archived (or would be, with --dry-run)."""
    from services.run_api.store import history

    args = parse_archive_args(argv)
    try:
        before = history.parse_cutoff(args.finished_before)
        url = db.resolve_database_url(args.database_url, args.data_dir)
        db.migrate(url)
        to = args.to or os.path.abspath(os.path.join(args.data_dir, "archive"))
        done = history.archive_runs(db.libpq_url(url), before, to, batch=args.batch, dry_run=args.dry_run)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except sqlalchemy.exc.OperationalError as err:
        print(f"error: cannot reach the database: {err.orig}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"would archive {done.runs} runs ({done.events} events) finished before {before.isoformat()}; "
              f"{done.kept} older finished runs kept (a step_cache entry or an unfinished rebuild points to them)")
    else:
        print(f"archived {done.runs} runs ({done.events} events) finished before {before.isoformat()} "
              f"into {len(done.files)} file(s) under {to}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["keys"]:
        return keys_main(args_list[1:])
    if args_list[:1] == ["archive"]:
        return archive_main(args_list[1:])
    try:
        env = ApiSettings.from_env()
        args = parse_args(argv, env)
        settings = dataclasses.replace(
            env,
            addr=args.addr,
            database_url=args.database_url,
            data_dir=args.data_dir,
            migrate_on_start=not args.no_migrate,
            lease_seconds=args.lease_seconds,
            embedded_worker=args.embedded_worker,
            processes=args.processes,
        )
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    group = args.command == "serve" and settings.processes > 1 and args.child_of is None
    configure_logging(settings.log, actor=f"api-{args.child_index}" if args.child_of is not None else "api")
    if not group:  # the parent of a group serves nothing: no spans of its own
        configure_tracing("runs-api")
    if args.child_of is not None and not _die_with_parent(args.child_of):
        print("error: the parent of this API process is gone", file=sys.stderr)
        return 1
    try:
        if args.command == "serve":
            # Refuse an unsafe address before anything starts.
            auth.resolve_mode(settings.auth, settings.addr, settings.http_addr)
        url = db.resolve_database_url(settings.database_url, settings.data_dir)
        if args.command == "migrate":
            db.migrate(url)
            print("database is at the latest migration")
            return 0
        if args.command == "replay":
            if settings.migrate_on_start:
                db.migrate(url)
            return asyncio.run(_replay(url))
        if group:
            return ApiProcesses(settings, url, args.with_worker).run()
        return asyncio.run(_serve(settings, url, args.with_worker, args.ready_fd))
    except KeyboardInterrupt:
        return 130
    except ListenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except auth.AuthConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except sqlalchemy.exc.OperationalError as err:
        print(f"error: cannot reach the database: {err.orig}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
