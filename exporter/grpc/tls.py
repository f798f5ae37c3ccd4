"""TLS for the Observer: server credentials (TLS, or mTLS with a client CA) and client
credentials (a CA to verify the server, optionally a client certificate), all from PEM files.

Place in the data flow: exporter/cli.py hands the file paths from exporter/config.py to
`server_credentials()` for the agent's and the relay's gRPC port, and to
`channel()` for the relay's connections to agents and for `meshlens observe|status`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import grpc

# keepalive: a peer that vanishes without closing (a node gone) is noticed in seconds
KEEPALIVE: Sequence[Tuple[str, int]] = (
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS: Sequence[Tuple[str, int]] = (
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
)


class TlsError(ValueError):
    """A certificate or key file that cannot be read; the message names it."""


def _read(path: Optional[Path], what: str) -> Optional[bytes]:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"{what} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Optional[Path] = None     # set: mTLS, clients must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        cert, key = _read(self.cert, "TLS certificate"), _read(self.key, "TLS key")
        ca = _read(self.client_ca, "TLS client CA")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTls:
    ca: Optional[Path] = None            # None: the system's roots
    cert: Optional[Path] = None          # with key: a client certificate (mTLS)
    key: Optional[Path] = None
    server_name: Optional[str] = None    # name to verify instead of the address's host

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise TlsError("a client certificate needs both its certificate and its key file")
        return grpc.ssl_channel_credentials(_read(self.ca, "TLS CA"), _read(self.key, "TLS key"),
                                            _read(self.cert, "TLS certificate"))


def channel(target: str, tls: Optional[ClientTls]) -> grpc.Channel:
    """A channel to `target` (host:port), TLS when `tls` is given."""
    options = list(KEEPALIVE)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))  # type: ignore[arg-type]
    return grpc.secure_channel(target, tls.credentials(), options=options)


def aio_channel(target: str, tls: Optional[ClientTls]) -> "grpc.aio.Channel":
    """The same as channel(), for an asyncio loop (the relay's links)."""
    options = list(KEEPALIVE)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))  # type: ignore[arg-type]
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)
