"""TLS, mutual TLS and bearer-token auth on a real grpc.aio server: refused without the
credentials, served with them. Certificates are made per test session by a throwaway CA."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from dynaroute.gateway.security import (
    BearerTokenInterceptor,
    bearer_call_credentials,
    bearer_metadata,
    channel_credentials,
    server_credentials,
)

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-tests"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _issue(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, usage: x509.ObjectIdentifier
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate from the same
    CA, and a client certificate from a second, untrusted CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _ca("dynaroute test CA")
    (d / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_crt, server_key = _write(
        d / "server", *_issue(ca_cert, ca_key, "localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    )
    client_crt, client_key = _write(d / "client", *_issue(ca_cert, ca_key, "client", ExtendedKeyUsageOID.CLIENT_AUTH))
    rogue_ca, rogue_ca_key = _ca("rogue CA")
    rogue_crt, rogue_key = _write(
        d / "rogue", *_issue(rogue_ca, rogue_ca_key, "rogue", ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    return {
        "ca": d / "ca.crt",
        "server_crt": server_crt,
        "server_key": server_key,
        "client_crt": client_crt,
        "client_key": client_key,
        "rogue_crt": rogue_crt,
        "rogue_key": rogue_key,
    }


async def _start(
    creds: grpc.ServerCredentials | None = None, interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the health and reflection services on 127.0.0.1:<free port>."""
    server = grpc.aio.server(interceptors=interceptors)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection([reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(_echo)}),))
    addr = "127.0.0.1:0"
    port = server.add_secure_port(addr, creds) if creds is not None else server.add_insecure_port(addr)
    await server.start()
    return server, port


async def _echo(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _unary(channel: grpc.aio.Channel, **kw: object) -> bytes:
    """A unary call that is not exempt from the token (raw bytes in, the same bytes out)."""
    return await channel.unary_unary("/test.Echo/Unary")(b"ping", timeout=5, **kw)


async def _health(channel: grpc.aio.Channel, **kw: object) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5, **kw)
    return reply.status


async def _list_services(channel: grpc.aio.Channel, **kw: object) -> list[str]:
    """A streaming call that is not exempt from the token: reflection's list of services."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5, **kw)
    names: list[str] = []
    async for reply in call:
        names += [s.name for s in reply.list_services_response.service]
    return names


async def test_tls_refuses_plaintext_and_serves_tls(pki: dict[str, Path]) -> None:
    server, port = await _start(server_credentials(pki["server_crt"], pki["server_key"]))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _health(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA is refused too.
        untrusted = channel_credentials(ca_path=pki["rogue_crt"])
        async with grpc.aio.secure_channel(f"localhost:{port}", untrusted) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await _health(ch)
        async with grpc.aio.secure_channel(f"localhost:{port}", channel_credentials(ca_path=pki["ca"])) as ch:
            assert await _health(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_mtls_refuses_client_without_trusted_cert(pki: dict[str, Path]) -> None:
    creds = server_credentials(pki["server_crt"], pki["server_key"], client_ca_path=pki["ca"])
    server, port = await _start(creds)
    target = f"localhost:{port}"
    try:
        for client in (
            channel_credentials(ca_path=pki["ca"]),  # no certificate
            channel_credentials(pki["ca"], pki["rogue_crt"], pki["rogue_key"]),  # one from another CA
        ):
            async with grpc.aio.secure_channel(target, client) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _health(ch)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        good = channel_credentials(pki["ca"], pki["client_crt"], pki["client_key"])
        async with grpc.aio.secure_channel(target, good) as ch:
            assert await _health(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_bearer_token_plaintext(pki: dict[str, Path]) -> None:
    rejected: list[str] = []
    server, port = await _start(interceptors=(BearerTokenInterceptor(TOKEN, on_rejected=rejected.append),))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for md in ((), bearer_metadata("wrong"), (("authorization", TOKEN),)):
                for call in (_list_services, _unary):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(ch, metadata=md)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "authorization: Bearer <token>" in (err.value.details() or "")
            assert health.SERVICE_NAME in await _list_services(ch, metadata=bearer_metadata(TOKEN))
            assert await _unary(ch, metadata=bearer_metadata(TOKEN)) == b"ping"
            # Health checks are exempt so that probes need no secret.
            assert await _health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert rejected == ["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "/test.Echo/Unary"] * 3
    finally:
        await server.stop(None)


async def test_a_streaming_client_without_token_sees_unauthenticated_while_still_sending() -> None:
    """A client still writing when it is refused: grpc.aio reports INTERNAL for a write in
    flight as the call ends (grpc/grpc#36066), which is what a loaded CI machine hit with one
    small message. 64 messages of 64 KiB keep the writes in flight every time, so without the
    server's fix every call here fails with INTERNAL."""
    server, port = await _start(interceptors=(BearerTokenInterceptor(TOKEN),))

    async def many_large() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for _ in range(64):
            yield reflection_pb2.ServerReflectionRequest(file_by_filename="x" * 65536)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            for _ in range(10):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _reply in stub.ServerReflectionInfo(many_large(), timeout=10):
                        pass
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
            assert await _health(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_bearer_token_call_credentials_over_tls(pki: dict[str, Path]) -> None:
    creds = server_credentials(pki["server_crt"], pki["server_key"])
    server, port = await _start(creds, interceptors=(BearerTokenInterceptor(TOKEN),))
    try:
        tls = channel_credentials(ca_path=pki["ca"])
        async with grpc.aio.secure_channel(f"localhost:{port}", tls) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _list_services(ch)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with_token = grpc.composite_channel_credentials(tls, bearer_call_credentials(TOKEN))
        async with grpc.aio.secure_channel(f"localhost:{port}", with_token) as ch:
            assert health.SERVICE_NAME in await _list_services(ch)
    finally:
        await server.stop(None)


def test_bad_paths_name_the_option(tmp_path: Path, pki: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="tls_key"):
        server_credentials(pki["server_crt"], tmp_path / "missing.key")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="tls_client_ca"):
        server_credentials(pki["server_crt"], pki["server_key"], tmp_path / "junk.pem")
    with pytest.raises(ValueError, match="cert_path and key_path"):
        channel_credentials(pki["ca"], cert_path=pki["client_crt"])


# -- the real gateway -------------------------------------------------------------------------


def _https(address: str, path: str, context: ssl.SSLContext, token: str | None = None,
           body: dict | None = None) -> tuple[int, dict[str, str], dict]:
    """One HTTPS call; status, headers and the JSON body (errors included)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"https://{address}{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _check_https(address: str, pki: dict[str, Path], x: object) -> None:
    """The HTTP/REST port under the same TLS, client certificates and token as the gRPC port."""
    import numpy as np

    def context(cert: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        if cert is not None:
            ctx.load_cert_chain(str(pki[f"{cert}_crt"]), str(pki[f"{cert}_key"]))
        return ctx

    infer = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                         "data": np.asarray(x, dtype=np.float32).tolist()}]}
    plain = urllib.request.Request(f"http://{address.replace('localhost', '127.0.0.1')}/v2/health/live")
    for what, ctx in {"no client certificate": context(), "untrusted client certificate": context("rogue")}.items():
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _https(address, "/v2/health/live", ctx)
            pytest.fail(what)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to the TLS port
        urllib.request.urlopen(plain, timeout=10).read()
    ctx = context("client")
    assert _https(address, "/v2/health/ready", ctx)[0] == 200  # probes need no token
    for token in (None, "wrong"):
        status, headers, reply = _https(address, "/v2/models/digits/infer", ctx, token, infer)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", reply
        assert "authorization: Bearer <token>" in reply["error"]
    status, _, reply = _https(address, "/v2/models/digits/infer", ctx, TOKEN, infer)
    assert status == 200 and reply["parameters"]["total_flops"] > 0, reply


def _non_loopback_ip() -> str | None:
    """An address of this machine other than loopback (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; this picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.slow
def test_dynaroute_serve_with_mtls_and_token(pki: dict[str, Path], digits_bundle_dir: Path, tmp_path: Path) -> None:
    """`dynaroute serve --tls-cert --tls-key --tls-client-ca --auth-token-file --http-port`: each
    missing credential is refused, all of them are served, on the gRPC and the HTTP/REST port
    alike; every port listens on loopback only."""
    from dynaroute.client import Client
    from dynaroute.data import load_digits_splits
    from tests.serving import ServerProcess

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = ServerProcess.start(
        digits_bundle_dir,
        "--tls-cert", str(pki["server_crt"]), "--tls-key", str(pki["server_key"]),
        "--tls-client-ca", str(pki["ca"]), "--auth-token-file", str(token_file), "--http-port", "0",
    )  # fmt: skip
    try:
        host, port = server.grpc_address.rsplit(":", 1)
        metrics_host, metrics_port = server.metrics_address.rsplit(":", 1)
        http_host, http_port = server.http_address.rsplit(":", 1)
        assert host == "127.0.0.1" and metrics_host == "127.0.0.1" and http_host == "127.0.0.1"
        ip = _non_loopback_ip()
        if ip is not None:
            for p in (int(port), int(metrics_port), int(http_port)):
                with pytest.raises(OSError):
                    socket.create_connection((ip, p), timeout=2).close()

        x = load_digits_splits().test.x[0]
        target = f"localhost:{port}"
        refused = {
            "plaintext": Client(f"127.0.0.1:{port}", token=TOKEN, timeout_s=10),
            "no client certificate": Client(target, ca=str(pki["ca"]), token=TOKEN, timeout_s=10),
            "untrusted client certificate": Client(
                target, ca=str(pki["ca"]), cert=str(pki["rogue_crt"]), key=str(pki["rogue_key"]), token=TOKEN
            ),
        }
        for what, client in refused.items():
            with client, pytest.raises(grpc.RpcError) as err:
                client.infer(x)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what

        mtls = {"ca": str(pki["ca"]), "cert": str(pki["client_crt"]), "key": str(pki["client_key"])}
        for token in (None, "wrong"):
            with Client(target, **mtls, token=token, timeout_s=10) as client, pytest.raises(grpc.RpcError) as err:
                client.infer(x)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <token>" in err.value.details()

        with Client(target, **mtls, token=TOKEN, timeout_s=30) as client:
            reply = client.infer(x, quality=1.0)
            assert reply.outputs.label_name and reply.cost.total_flops > 0

        _check_https(f"localhost:{http_port}", pki, x)

        # The calls the token check refused are counted, by API (two on each port); the TLS
        # refusals never reached a server. Children that saw no request yet exist at zero.
        text = urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10).read().decode()
        requests = {
            (s.labels["api"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "dynaroute_requests_total" and s.labels["model"] == server.model
        }
        assert requests[("native", "unauthenticated")] == 2
        assert requests[("native", "ok")] == 1
        assert requests[("kserve", "ok")] == requests[("kserve", "unauthenticated")] == 0
        assert requests[("kserve_http", "unauthenticated")] == 2
        assert requests[("kserve_http", "ok")] == 1
    finally:
        assert server.stop() == 0, server.output()
