"""Securing the gRPC and HTTP ports: TLS, mutual TLS and an optional bearer token.

The server side builds `grpc.ServerCredentials` from PEM files and installs
`BearerTokenInterceptor`; the client side builds `grpc.ChannelCredentials` and sends the
token as `authorization: Bearer <token>` metadata. Health checks are exempt from the token
(not from TLS) so that load balancers and Kubernetes probes can ask whether the server is
serving without holding the secret; they reveal nothing else.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import grpc

from dynaroute import metrics
from dynaroute.gateway.decoding import Continuation

# Method prefixes that answer without a token: only the standard health service.
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
AUTH_HEADER = "authorization"
_SCHEME = "bearer "


def _read_pem(path: str | Path, what: str) -> bytes:
    """Read a PEM file, failing with a message that names the option it came from."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: {str(p)!r} is not a readable file; expected a PEM file")
    data = p.read_bytes()
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what}: {str(p)!r} is not PEM; expected '-----BEGIN ...' blocks")
    return data


def read_token_file(path: str | Path) -> str:
    """The bearer token in a file (surrounding whitespace dropped); an empty file is refused."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"auth_token_file: {str(p)!r} is not a readable file")
    token = p.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"auth_token_file: {str(p)!r} must hold one non-empty token without spaces")
    return token


def server_credentials(
    cert_path: str | Path, key_path: str | Path, client_ca_path: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for the gateway; with `client_ca_path`, mutual TLS: every client must
    present a certificate signed by that CA or the handshake fails."""
    cert = _read_pem(cert_path, "tls_cert")
    key = _read_pem(key_path, "tls_key")
    client_ca = _read_pem(client_ca_path, "tls_client_ca") if client_ca_path is not None else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_ssl_context(
    cert_path: str | Path, key_path: str | Path, client_ca_path: str | Path | None = None
) -> ssl.SSLContext:
    """The same TLS (and, with `client_ca_path`, mutual TLS) as `server_credentials`, for the
    HTTP/REST port: one set of files secures both transports."""
    _read_pem(cert_path, "tls_cert")  # the same checks and messages as the gRPC port's
    _read_pem(key_path, "tls_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert_path), str(key_path))
        if client_ca_path is not None:
            _read_pem(client_ca_path, "tls_client_ca")
            context.load_verify_locations(cafile=str(client_ca_path))
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as e:
        raise ValueError(f"tls_cert, tls_key, tls_client_ca: not a usable certificate, key and CA ({e})") from None
    return context


def channel_credentials(
    ca_path: str | Path | None = None, cert_path: str | Path | None = None, key_path: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a client. `ca_path` verifies the server (default: the system's
    roots); `cert_path` and `key_path` together present a client certificate for mutual TLS."""
    if (cert_path is None) != (key_path is None):
        raise ValueError("cert_path and key_path: give both (mutual TLS) or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_path, "ca") if ca_path is not None else None,
        private_key=_read_pem(key_path, "key") if key_path is not None else None,
        certificate_chain=_read_pem(cert_path, "cert") if cert_path is not None else None,
    )


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying the token; works on plaintext and TLS channels alike."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


def bearer_call_credentials(token: str) -> grpc.CallCredentials:
    """Call credentials sending the token on every call of a TLS channel (combine them with
    `grpc.composite_channel_credentials`); gRPC refuses call credentials on plaintext."""
    return grpc.access_token_call_credentials(token)


def count_rejected(apis: Mapping[str, str], model: Callable[[], str]) -> Callable[[str], None]:
    """An `on_rejected` for BearerTokenInterceptor that counts a refused call in
    dynaroute_requests_total{model, api, status="unauthenticated"}. `apis` maps a full service
    name to its api label; calls to other services (reflection) are not model requests and are
    not counted. `model()` gives the model label at the time of the call."""

    def on_rejected(method: str) -> None:
        api = apis.get(method.lstrip("/").split("/", 1)[0])  # "/package.Service/Method"
        if api is not None:
            metrics.record_request(model(), api, "unauthenticated")

    return on_rejected


# How long, and for how many messages, a refused streaming call is read before its status is
# sent. grpc.aio clients report INTERNAL ("Failed execute_batch: SendMessageOperation") instead
# of the server's status when a write of theirs is still in flight as the call ends
# (grpc/grpc#36066); reading what they send until they half-close lets every write complete, so
# they see UNAUTHENTICATED whatever the timing. The bounds keep a refused client from holding
# the call open: past them, the status goes out anyway.
REFUSED_STREAM_DRAIN_S = 2.0
REFUSED_STREAM_MAX_MESSAGES = 1024


async def _drain(requests: AsyncIterator[bytes]) -> None:
    """Read (and discard, undecoded) a refused call's messages until the client half-closes,
    within the bounds above."""

    async def read() -> None:
        count = 0
        async for _ in requests:
            count += 1
            if count >= REFUSED_STREAM_MAX_MESSAGES:
                return

    try:
        await asyncio.wait_for(read(), REFUSED_STREAM_DRAIN_S)
    except (TimeoutError, grpc.RpcError):
        pass


def bearer_problem(values: Sequence[str | bytes], expected: bytes, where: str = "metadata") -> str | None:
    """None when the first `authorization` value (of `values`) is `expected` ("Bearer <token>"),
    else what was wrong; `where` names what carried it (gRPC metadata, an HTTP header). The
    comparison is constant-time (hmac.compare_digest) so response timing does not leak the token."""
    if not values:
        return f"missing 'authorization' {where}; expected 'authorization: Bearer <token>'"
    value = values[0].encode() if isinstance(values[0], str) else values[0]
    if not value.lower().startswith(_SCHEME.encode()):
        return f"'authorization' {where} is not a bearer token; expected 'authorization: Bearer <token>'"
    # Normalise the scheme's case only; the token itself is compared byte for byte.
    if not hmac.compare_digest(b"Bearer " + value[len(_SCHEME) :], expected):
        return "bearer token not accepted; expected 'authorization: Bearer <token>' with this server's token"
    return None


def expected_bearer(token: str) -> bytes:
    """What `bearer_problem` compares against for `token`."""
    if not token:
        raise ValueError("token: must be a non-empty string")
    return f"Bearer {token}".encode()


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that only refuses the call. Requests
    are never decoded (no deserializer): nothing a refused client sends is parsed."""

    async def abort(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def abort_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await _drain(requests)
        await context.abort(code, message)

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_stream, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless a call carries `authorization: Bearer <token>`
    (checked by `bearer_problem`, as the HTTP transport checks its header). Methods starting
    with one of `exempt_prefixes` (default: the health service) pass without a token.
    `on_rejected(method)` is called for each refused call (e.g. to count it in
    dynaroute_requests_total{status="unauthenticated"}).
    """

    def __init__(
        self,
        token: str,
        exempt_prefixes: Sequence[str] = (HEALTH_METHOD_PREFIX,),
        on_rejected: Callable[[str], None] | None = None,
    ) -> None:
        self._expected = expected_bearer(token)
        self._exempt = tuple(exempt_prefixes)
        self._on_rejected = on_rejected

    def _check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None when authorised, else what was wrong."""
        return bearer_problem([v for k, v in (metadata or ()) if k.lower() == AUTH_HEADER], self._expected)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        problem = self._check(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        if self._on_rejected is not None:
            self._on_rejected(handler_call_details.method)
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
