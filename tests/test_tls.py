"""TLS on the API's port: a real API process with certificates made at test time.

A CA signs the server's certificate (127.0.0.1 and localhost) and a client certificate; a second,
unrelated CA stands for "the wrong CA". Clients connect through shared.channels, as the worker
and the CLI do. No test sleeps: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from features.harness import Api, Process, Worker, base_env, free_port, wait_until
from services.cli import __main__ as cli
from services.run_api import tls
from services.run_worker.worker import Worker as RunWorker
from shared.channels import channel
from shared.gen.runs.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from shared.settings import ApiSettings, ClientTls, WorkerSettings

# --- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server and a client certificate it signed, and an unrelated CA with its own client."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def _ca(directory: Path, stem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(f"runs test {stem}", _name(f"runs test {stem}"), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(directory, stem, cert, None)
    return cert, key


def _leaf(
    directory: Path, stem: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], server: bool
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(stem, ca[0].subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    _write(directory, stem, builder.sign(ca[1], hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for this module's tests (EC P-256: quick to make)."""
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "ca")
    _leaf(d, "server", ca, server=True)
    _leaf(d, "client", ca, server=False)
    other = _ca(d, "other-ca")
    _leaf(d, "other-client", other, server=False)
    return Pki(
        ca=str(d / "ca.crt"),
        server_cert=str(d / "server.crt"),
        server_key=str(d / "server.key"),
        client_cert=str(d / "client.crt"),
        client_key=str(d / "client.key"),
        other_ca=str(d / "other-ca.crt"),
        other_client_cert=str(d / "other-client.crt"),
        other_client_key=str(d / "other-client.key"),
    )


# --- a TLS API ---------------------------------------------------------------------------------


class TlsApi(Api):
    """The API as a process with TLS on; its health is checked over TLS with `client_tls`."""

    def __init__(
        self, database_url: str, pki: Pki, client_tls: ClientTls, mutual: bool = False, **env: str
    ) -> None:
        env.update(RUN_API_TLS_CERT=pki.server_cert, RUN_API_TLS_KEY=pki.server_key)
        if mutual:
            env["RUN_API_TLS_CLIENT_CA"] = pki.ca
        super().__init__(database_url, **env)
        self.client_tls = client_tls

    def health(self) -> str:
        """The overall health status name over TLS, or UNREACHABLE."""
        with channel(self.addr, self.client_tls) as ch:
            try:
                response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return "UNREACHABLE"
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@pytest.fixture
def tls_api(database_url: str, pki: Pki) -> Iterator[TlsApi]:
    """An API serving TLS only."""
    api = TlsApi(database_url, pki, ClientTls(ca=pki.ca))
    api.start()
    yield api
    api.stop()


@pytest.fixture
def mtls_api(database_url: str, pki: Pki) -> Iterator[TlsApi]:
    """An API that requires a client certificate signed by the test CA (mutual TLS)."""
    api = TlsApi(database_url, pki, ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key), mutual=True)
    api.start()
    yield api
    api.stop()


def start_and_get(addr: str, client_tls: ClientTls | None) -> run_pb2.Run:
    """StartRun then GetRun of the same run; returns what GetRun answered."""
    with channel(addr, client_tls) as ch:
        stub = run_service_pb2_grpc.RunServiceStub(ch)
        started = stub.StartRun(run_service_pb2.StartRunRequest(workflow="runtime.noop"), timeout=10).run
        got = stub.GetRun(run_service_pb2.GetRunRequest(run_id=started.run_id), timeout=10).run
    assert got.run_id == started.run_id
    return got


def refused(addr: str, ch: grpc.Channel) -> grpc.RpcError:
    """The error of one call on `ch`, which must fail; the channel is closed afterwards."""
    with ch:
        with pytest.raises(grpc.RpcError) as info:
            run_service_pb2_grpc.RunServiceStub(ch).ListRuns(run_service_pb2.ListRunsRequest(), timeout=5)
    return info.value


# --- one-way TLS -------------------------------------------------------------------------------


def test_a_client_trusting_the_ca_starts_and_gets_a_run_over_tls(tls_api: TlsApi, pki: Pki) -> None:
    run = start_and_get(tls_api.addr, ClientTls(ca=pki.ca))
    assert run.status == run_pb2.RUN_STATUS_QUEUED and run.workflow == "runtime.noop"
    # the certificate names localhost as well as 127.0.0.1
    start_and_get(f"localhost:{tls_api.port}", ClientTls(ca=pki.ca))


def test_a_client_trusting_another_ca_fails_the_handshake(tls_api: TlsApi, pki: Pki) -> None:
    error = refused(tls_api.addr, channel(tls_api.addr, ClientTls(ca=pki.other_ca)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "handshake" in (error.details() or "").lower()


def test_a_plaintext_client_is_refused(tls_api: TlsApi) -> None:
    error = refused(tls_api.addr, grpc.insecure_channel(tls_api.addr))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_the_cli_connects_with_tls_ca_and_explains_a_refusal(
    tls_api: TlsApi, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--addr", tls_api.addr, "--tls-ca", pki.ca, "start", "--project", "p1", "--json"]) == 0
    assert '"status": "QUEUED"' in capsys.readouterr().out
    assert cli.main(["--addr", tls_api.addr, "list"]) == 5
    assert "if it serves TLS, pass --tls-ca" in capsys.readouterr().err
    assert cli.main(["--addr", tls_api.addr, "--tls-ca", pki.other_ca, "list"]) == 5
    assert "the TLS handshake failed" in capsys.readouterr().err


def test_the_cli_manages_keys_and_shows_who_started_and_canceled_over_tls(
    database_url: str, pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = f"test-admin-{secrets.token_urlsafe(24)}"
    api = TlsApi(
        database_url, pki, ClientTls(ca=pki.ca),
        RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=admin, RUNS_AUTH_CACHE_SECONDS="0",
    )
    api.start()
    try:
        monkeypatch.setenv("RUN_API_ADDR", api.addr)
        monkeypatch.setenv("RUNS_TLS_CA", pki.ca)

        def runs(key: str | None, *argv: str) -> tuple[int, str, str]:
            if key is None:
                monkeypatch.delenv("RUNS_API_KEY", raising=False)
            else:
                monkeypatch.setenv("RUNS_API_KEY", key)
            code = cli.main(list(argv))
            captured = capsys.readouterr()
            return code, captured.out, captured.err

        code, out, err = runs(admin, "keys", "create", "--role", "client", "--project", "billing", "--json")
        assert code == 0, err
        created = json.loads(out)
        key_id, secret = created["key"]["key_id"], created["secret"]
        assert created["key"]["project_id"] == "billing" and "only time the secret is shown" in err

        code, out, err = runs(secret, "start", "--json")
        assert code == 0, err
        run_id = json.loads(out)["run_id"]
        assert runs(secret, "cancel", run_id, "--reason", "not needed")[0] == 0
        code, out, err = runs(secret, "get", run_id)
        assert code == 0, err
        fields = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line and line[0] != " "}
        assert fields["started_by"] == key_id and fields["canceled_by"] == key_id
        assert fields["cancel_reason"] == "not needed" and fields["project_id"] == "billing"

        code, _, err = runs(secret, "keys", "list")
        assert code == 6 and "PERMISSION_DENIED" in err and secret not in err
        code, _, err = runs(None, "list")
        assert code == 6 and "needs an API key" in err

        code, out, err = runs(admin, "keys", "list", "--json")
        assert code == 0 and key_id in [k["key_id"] for k in json.loads(out)["keys"]]
        code, out, err = runs(admin, "keys", "revoke", key_id)
        assert code == 0 and "revoked" in out
        code, _, err = runs(secret, "list")
        assert code == 6 and "did not accept the API key" in err
    finally:
        api.stop()


# --- mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_api: TlsApi, pki: Pki) -> None:
    error = refused(mtls_api.addr, channel(mtls_api.addr, ClientTls(ca=pki.ca)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_api: TlsApi, pki: Pki) -> None:
    other = ClientTls(ca=pki.ca, cert=pki.other_client_cert, key=pki.other_client_key)
    error = refused(mtls_api.addr, channel(mtls_api.addr, other))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_a_client_certificate_signed_by_the_client_ca(mtls_api: TlsApi, pki: Pki) -> None:
    run = start_and_get(mtls_api.addr, ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key))
    assert run.status == run_pb2.RUN_STATUS_QUEUED


def test_the_cli_sends_its_client_certificate(
    mtls_api: TlsApi, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--addr", mtls_api.addr, "--tls-ca", pki.ca]
    assert cli.main([*base, "list"]) == 5
    assert "pass --tls-cert and --tls-key" in capsys.readouterr().err
    assert cli.main([*base, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key, "list", "--json"]) == 0


# --- a worker over TLS -------------------------------------------------------------------------


async def test_a_worker_with_tls_settings_completes_a_run(tls_api: TlsApi, pki: Pki) -> None:
    run_id = start_and_get(tls_api.addr, ClientTls(ca=pki.ca)).run_id
    worker = RunWorker(WorkerSettings(api_addr=tls_api.addr, tls=ClientTls(ca=pki.ca), poll_ms=100))
    try:
        counters = await worker.run_cycle()
    finally:
        await worker.close()
    assert (counters["claimed"], counters["succeeded"]) == (1, 1)
    with channel(tls_api.addr, ClientTls(ca=pki.ca)) as ch:
        run = run_service_pb2_grpc.RunServiceStub(ch).GetRun(run_service_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.run.status == run_pb2.RUN_STATUS_SUCCEEDED


def test_a_worker_process_with_runs_tls_ca_completes_a_run(tls_api: TlsApi, pki: Pki) -> None:
    run_id = start_and_get(tls_api.addr, ClientTls(ca=pki.ca)).run_id
    worker = Worker(tls_api.addr, RUNS_TLS_CA=pki.ca, RUN_WORKER_POLL_MS="100")
    worker.start()
    try:
        with channel(tls_api.addr, ClientTls(ca=pki.ca)) as ch:
            stub = run_service_pb2_grpc.RunServiceStub(ch)

            def succeeded() -> bool:
                assert worker.running, f"worker exited:\n{worker.output()}"
                # the API hangs up on a plaintext client at once: fail then, not at the deadline
                assert "Socket closed" not in worker.output(), "the worker connected without TLS"
                run = stub.GetRun(run_service_pb2.GetRunRequest(run_id=run_id), timeout=5).run
                return run.status == run_pb2.RUN_STATUS_SUCCEEDED

            wait_until(succeeded, 30, f"run {run_id} SUCCEEDED through a TLS worker", interval=0.05)
    finally:
        assert worker.stop() == 0, worker.output()


# --- binding -----------------------------------------------------------------------------------


def settings(**files: str) -> ApiSettings:
    """API settings on a free port with the given TLS files."""
    return ApiSettings(addr=f"127.0.0.1:{free_port()}", **files)  # type: ignore[arg-type]


def test_without_tls_files_there_are_no_credentials_and_the_port_is_plaintext() -> None:
    assert tls.server_credentials(ApiSettings()) is None


async def test_bind_returns_the_port_with_tls_and_0_when_the_address_is_taken(pki: Pki) -> None:
    config = settings(tls_cert=pki.server_cert, tls_key=pki.server_key)
    first, second = (grpc.aio.server(options=[("grpc.so_reuseport", 0)]) for _ in range(2))
    port = tls.bind(first, config)
    assert port == int(config.addr.rsplit(":", 1)[1])
    await first.start()
    try:
        assert tls.bind(second, config) == 0
    finally:
        await first.stop(None)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"tls_cert": "client_cert", "tls_key": "server_key"}, "does the key belong to the certificate"),
        ({"tls_cert": "server_key", "tls_key": "server_key"}, "RUN_API_TLS_CERT: "),
        ({"tls_cert": "server_cert", "tls_key": "server_cert"}, "RUN_API_TLS_KEY: "),
        ({"tls_cert": "server_cert", "tls_key": "server_key", "tls_client_ca": "server_key"}, "RUN_API_TLS_CLIENT_CA"),
    ],
)
async def test_bind_names_unusable_tls_files(pki: Pki, fields: dict[str, str], fragment: str) -> None:
    config = settings(**{name: getattr(pki, attr) for name, attr in fields.items()})
    with pytest.raises(tls.TlsError, match=fragment):
        tls.bind(grpc.aio.server(), config)


def test_the_api_exits_with_a_clear_error_when_the_key_does_not_match(database_url: str, pki: Pki) -> None:
    api = Process(
        [sys.executable, "-m", "services.run_api", "--addr", f"127.0.0.1:{free_port()}", "--database-url",
         database_url],
        base_env(RUN_API_TLS_CERT=pki.client_cert, RUN_API_TLS_KEY=pki.server_key),
        "api-bad-tls",
    )
    api.start()
    try:
        wait_until(lambda: not api.running, 60, "the API to exit")
        assert api.stop() == 1
        assert "with TLS: gRPC refused RUN_API_TLS_CERT / RUN_API_TLS_KEY" in api.output()
        assert "Traceback" not in api.output()
    finally:
        api.kill()
