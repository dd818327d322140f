"""Real processes for the acceptance suite: the API and workers as subprocesses, and a thin client.

Nothing here sleeps to wait: every wait is a condition polled against a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.channels import channel as open_channel
from shared.gen.runs.v1 import (
    key_service_pb2,
    key_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from shared.workflow import to_proto_dict

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        last = predicate()
    return last


# Under pytest-xdist (make test) each worker process takes ports from its own block of 250 below the
# kernel's ephemeral range (which serves bind(0) and outgoing connections): a port chosen here stays
# free until the process it is meant for binds it, which another worker's choice could otherwise take.
# The blocks of a session start at an offset drawn from its run id (PYTEST_XDIST_TESTRUNUID), and each
# worker starts at a point of its block drawn the same way, so two pytest sessions on one machine rarely
# walk the same ports in step.
_PORT_BLOCKS, _PORT_BLOCK, _BLOCK_COUNT = 20_000, 250, 48  # 20000..31999
_SESSION = int(hashlib.sha256(os.environ.get("PYTEST_XDIST_TESTRUNUID", "").encode()).hexdigest()[:8], 16)
_next_port = itertools.count(_SESSION % _PORT_BLOCK)


def free_port() -> int:
    """A TCP port nobody listens on right now (in this xdist worker's own block when there is one)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    base = _PORT_BLOCKS + ((_SESSION // _PORT_BLOCK + int(worker[2:])) % _BLOCK_COUNT) * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = base + next(_next_port) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken by something else on the machine
                continue
            return port
    raise AssertionError(f"no free port in {base}..{base + _PORT_BLOCK - 1}")


class Process:
    """A subprocess with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, args: list[str], env: dict[str, str], name: str) -> None:
        self.args, self.env, self.name = args, env, name
        self.log_path = Path(tempfile.mkstemp(prefix=f"runs-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def signal(self, sig: int) -> None:
        """Send a signal if it is running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def running(self) -> bool:
        """Whether it is alive."""
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """What it printed so far."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    """Start the processes in order (an API before its workers); stop them in reverse order afterwards."""
    started: list[Process] = []
    try:
        for process in processes:
            process.start()
            started.append(process)
        yield
    finally:
        for process in reversed(started):
            process.stop()


def base_env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours, minus settings that would leak in, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUN_", "RUNS_", "DATABASE_URL", "OTEL_"))}
    # No HTTP side unless asked for (Api gives each API a free port): parallel tests would share 8080.
    env.update({"PYTHONUNBUFFERED": "1", "LOG_LEVEL": "info", "RUN_API_HTTP_ADDR": ""})
    env.update(extra)
    return env


def api_processes() -> int:
    """API processes per Api: RUNS_TEST_API_PROCESSES (default 1; 2 runs the suites against a process group)."""
    raw = os.environ.get("RUNS_TEST_API_PROCESSES", "1").strip() or "1"
    assert raw.isdigit() and int(raw) >= 1, f"RUNS_TEST_API_PROCESSES must be a whole number >= 1, got {raw!r}"
    return int(raw)


class Api(Process):
    """The run API as a real process on a free port (or a given one, to restart in place).

    With `processes` above 1 (default: RUNS_TEST_API_PROCESSES) it is a parent with that many API
    processes on the port (RUN_API_PROCESSES), and start() waits until every one of them serves.
    """

    def __init__(
        self, database_url: str, port: int = 0, processes: int | None = None, http_port: int = 0, **env: str
    ) -> None:
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        # The HTTP side on a free port of its own (never the default 8080, which parallel tests would share).
        self.http_port = http_port or free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        env = {"RUN_API_HTTP_ADDR": f"127.0.0.1:{self.http_port}", **env}
        self.processes = processes or api_processes()
        if self.processes > 1:
            env = {"RUN_API_PROCESSES": str(self.processes), **env}
        super().__init__(
            [sys.executable, "-m", "services.run_api", "--addr", self.addr, "--database-url", database_url],
            base_env(**env),
            "api",
        )

    def start(self) -> None:
        """Start and wait until the health service says SERVING (from every API process of a group)."""
        super().start()
        if self.processes > 1:
            def all_serve() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"API exited with {self.proc.returncode}:\n{self.output()}")
                return f"with {self.processes} processes (pids" in self.output()

            wait_until(all_serve, 60, f"{self.processes} API processes", interval=0.05)
        self.wait_health("SERVING", 30)

    def health(self) -> str:
        """The overall health status name, or UNREACHABLE."""
        with grpc.insecure_channel(self.addr) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return "UNREACHABLE"
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_health(self, status: str, timeout: float) -> None:
        """Wait until health reports `status`."""
        def check() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"API exited with {self.proc.returncode}:\n{self.output()}")
            return self.health() == status

        wait_until(check, timeout, f"API health {status}", interval=0.05)


class Worker(Process):
    """A worker process connected to an API."""

    def __init__(self, addr: str, *flags: str, **env: str) -> None:
        super().__init__(
            [sys.executable, "-m", "services.run_worker", *flags], base_env(RUN_API_ADDR=addr, **env), "worker"
        )


def worker_once(addr: str, *flags: str, timeout: float = 60, **env: str) -> dict[str, int]:
    """Run `python -m services.run_worker --once` and return its JSON counters."""
    done = subprocess.run(
        [sys.executable, "-m", "services.run_worker", "--once", *flags],
        env=base_env(RUN_API_ADDR=addr, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"worker --once exited {done.returncode}:\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line, got:\n{done.stdout}"
    return dict(json.loads(lines[0]))


STATUS = {name.removeprefix("RUN_STATUS_"): value for name, value in run_pb2.RunStatus.items()}


def auth_mode() -> str:
    """How the acceptance suite runs the API: RUNS_TEST_AUTH=required (keys for everything) or off (default)."""
    mode = os.environ.get("RUNS_TEST_AUTH", "off").strip() or "off"
    assert mode in ("off", "required"), f"RUNS_TEST_AUTH must be off or required, got {mode!r}"
    return mode


def host_key(url: str, role: str, tenant: str = "default") -> tuple[str, str]:
    """`python -m services.run_api keys create` on the API host (any tenant, no key needed); the key's (id, secret)."""
    done = subprocess.run(
        [sys.executable, "-m", "services.run_api", "keys", "create", "--role", role, "--tenant", tenant,
         "--database-url", url],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, f"keys create exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    key_id = re.search(r"^key id:\s+(\S+)", done.stdout, re.M)
    secret = re.search(r"^secret:\s+(\S+)", done.stdout, re.M)
    assert key_id and secret, done.stdout
    return key_id.group(1), secret.group(1)


def create_key(addr: str, admin_key: str, role: str, **fields: Any) -> tuple[str, str]:
    """A new key's (id, secret), made through KeyService with an admin key."""
    with open_channel(addr, api_key=admin_key) as channel:
        response = key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            key_service_pb2.CreateKeyRequest(role=key_service_pb2.KeyRole.Value(f"KEY_ROLE_{role.upper()}"), **fields),
            timeout=10,
        )
    return str(response.key.key_id), str(response.secret)


class Client:
    """A thin synchronous client of runs.v1.RunService (with an API key when the API requires one)."""

    def __init__(self, addr: str, api_key: str | None = None) -> None:
        self.channel = open_channel(addr, api_key=api_key)
        self.stub = run_service_pb2_grpc.RunServiceStub(self.channel)
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def start(self, workflow: str = "", run_input: dict[str, Any] | None = None, **fields: Any) -> Any:
        """StartRun; returns the response."""
        request = run_service_pb2.StartRunRequest(workflow=workflow, **fields)
        if run_input is not None:
            request.input.update(run_input)
        return self.stub.StartRun(request, timeout=10)

    def start_tool(self, tool: str, args: dict[str, Any] | None = None, **fields: Any) -> Any:
        """StartRun of a one-step runtime.tool workflow; returns the run."""
        return self.start("runtime.tool", {"tool": tool, "args": args or {}}, **fields).run

    def get(self, run_id: str) -> Any:
        """GetRun."""
        return self.stub.GetRun(run_service_pb2.GetRunRequest(run_id=run_id), timeout=10)

    def status(self, run_id: str) -> str:
        """The run's status name (QUEUED, RUNNING, ...)."""
        return str(run_pb2.RunStatus.Name(self.get(run_id).run.status)).removeprefix("RUN_STATUS_")

    def cancel(self, run_id: str, reason: str = "") -> Any:
        """CancelRun; returns the run."""
        return self.stub.CancelRun(run_service_pb2.CancelRunRequest(run_id=run_id, reason=reason), timeout=10).run

    def watch(self, run_id: str, after: int = 0, timeout: float = 60) -> Iterator[Any]:
        """WatchRun events."""
        request = run_service_pb2.WatchRunRequest(run_id=run_id, after_sequence=after)
        for response in self.stub.WatchRun(request, timeout=timeout):
            yield response.event

    def register(self, spec: dict[str, Any]) -> Any:
        """RegisterWorkflow with a spec in its file form; returns the response."""
        message = json_format.ParseDict(to_proto_dict(spec), workflow_service_pb2.WorkflowSpec())
        return self.workflows.RegisterWorkflow(workflow_service_pb2.RegisterWorkflowRequest(spec=message), timeout=10)

    def steps(self, run_id: str, status: str = "") -> dict[str, Any]:
        """ListRunSteps, by step key (only steps in `status` when given)."""
        value = run_pb2.StepStatus.Value(f"STEP_STATUS_{status}" if status else "STEP_STATUS_UNSPECIFIED")
        response = self.stub.ListRunSteps(run_service_pb2.ListRunStepsRequest(run_id=run_id, status=value), timeout=10)
        return {step.step_key: step for step in response.steps}

    def step_status(self, run_id: str, key: str) -> str:
        """One step's status name (CREATED, RUNNING, ...; "" while it does not exist)."""
        step = self.steps(run_id).get(key)
        return str(run_pb2.StepStatus.Name(step.status)).removeprefix("STEP_STATUS_") if step else ""

    def artifacts(self, run_id: str) -> list[Any]:
        """ListRunArtifacts."""
        request = run_service_pb2.ListRunArtifactsRequest(run_id=run_id)
        return list(self.stub.ListRunArtifacts(request, timeout=10).artifacts)

    def download(self, run_id: str, step_key: str, name: str) -> tuple[Any, bytes]:
        """DownloadArtifact: (the Artifact, its bytes)."""
        request = run_service_pb2.DownloadArtifactRequest(run_id=run_id, step_key=step_key, name=name)
        artifact, chunks = None, []
        for message in self.stub.DownloadArtifact(request, timeout=30):
            if message.HasField("artifact"):
                artifact = message.artifact
            chunks.append(message.chunk)
        return artifact, b"".join(chunks)

    def wait_status(self, run_id: str, statuses: set[str], timeout: float) -> str:
        """Wait until the run is in one of `statuses`; returns it."""
        return wait_until(
            lambda: (s if (s := self.status(run_id)) in statuses else ""), timeout, f"run {run_id} in {statuses}"
        )


def payload(event: Any) -> dict[str, Any]:
    """A RunEvent's payload as a dict."""
    return dict(json_format.MessageToDict(event.payload))
