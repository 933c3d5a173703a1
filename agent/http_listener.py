"""The HTTP API's listener: hypercorn's configuration, TLS that reloads, and TLS towards peers.

TLS on the listener
-------------------
With `[http] tls_cert_file` and `tls_key_file` set, hypercorn serves HTTPS only
(its `ssl_enabled`: both files named). Hypercorn asks its config once, at
start, for the `ssl.SSLContext` its listeners wrap every accepted connection
with (`Config.create_ssl_context`, called by hypercorn.trio's worker_serve).
`_ReloadableConfig` hands it one context that this module keeps, so that a
SIGHUP can load the renewed certificate chain into that same object
(`SSLContext.load_cert_chain`): each new connection's handshake uses the new
certificate, connections already open keep theirs, and the listening socket
is never closed. A chain that does not load (missing file, key not matching
the certificate) is tried on a scratch context first, so a bad renewal leaves
the certificate in force untouched and is reported in the log.

TLS towards peers
-----------------
An agent forwards to the leader at the URL the leader gossips
(`https://<advertised ip>:<port>` when the leader serves TLS). `peer_context`
verifies those certificates against `[http] tls_ca_file` (else the system's
trust store), with host name checking on: agents are addressed by IP, so each
certificate must carry its agent's advertised IP in subjectAltName. A SIGHUP
adds the CA file's certificates again (a CA bundle that gained a new CA is
trusted without a restart; OpenSSL offers no way to remove one from a live
context, so dropping a CA needs a restart).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from hypercorn.config import Config as HypercornConfig

from agent.config import AgentConfig, HttpSection, exposure_warnings
from agent.config_checks import ConfigError

log = logging.getLogger(__name__)

# Hypercorn's graceful shutdown bound: in-flight requests get this long after SIGTERM.
GRACEFUL_TIMEOUT_S = 10.0


class _ReloadableConfig(HypercornConfig):
    """A hypercorn Config whose SSL context is one object kept by ApiTls (see the module docstring)."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._context = context

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


class ApiTls:
    """The listener's SSL context (None with TLS off) and the context used to verify peers.

    Raises ConfigError when the certificate, key or CA file does not load.
    """

    def __init__(self, http: HttpSection) -> None:
        self.cert_file: Path | None = http.tls_cert_file
        self.key_file: Path | None = http.tls_key_file
        self.ca_file: Path | None = http.tls_ca_file
        self.server: ssl.SSLContext | None = None
        if self.cert_file is not None and self.key_file is not None:
            # Hypercorn's own recipe (TLS >= 1.2, ALPN h2/http1.1, its cipher list), then our chain.
            scratch = HypercornConfig()
            scratch.certfile, scratch.keyfile = str(self.cert_file), str(self.key_file)
            try:
                self.server = scratch.create_ssl_context()
            except (OSError, ssl.SSLError) as error:
                raise ConfigError(
                    f"[http] tls_cert_file {self.cert_file} / tls_key_file {self.key_file} do not load as a "
                    f"PEM certificate chain and its private key: {error}",
                    key="http.tls_cert_file",
                ) from None
        try:
            self.peer = ssl.create_default_context(cafile=None if self.ca_file is None else str(self.ca_file))
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(
                f"[http] tls_ca_file {self.ca_file} does not load as PEM CA certificates: {error}",
                key="http.tls_ca_file",
            ) from None

    @property
    def enabled(self) -> bool:
        return self.server is not None

    def reload(self) -> str:
        """Re-read the certificate chain and the CA file into the live contexts; return what happened, for the log.

        Never raises for a bad file: the contexts in force are kept and the reason returned.
        """
        if self.server is None or self.cert_file is None or self.key_file is None:
            return "TLS: off"
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            return f"TLS certificate NOT reloaded, keeping the one in force ({self.cert_file}: {error})"
        self.server.load_cert_chain(self.cert_file, self.key_file)
        done = f"TLS certificate reloaded from {self.cert_file}"
        if self.ca_file is not None:
            try:
                self.peer.load_verify_locations(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as error:
                return f"{done}; peer CA file NOT reloaded ({self.ca_file}: {error})"
            done += f"; peer CA file {self.ca_file} re-read"
        return done


def hypercorn_config(config: AgentConfig, tls: ApiTls) -> HypercornConfig:
    """Return hypercorn's configuration for the API listener; logs the exposure warnings once, at start.

    """
    http = config.http
    hconfig = _ReloadableConfig(tls.server)
    hconfig.bind = [_bind_address(http.bind, http.port)]
    if tls.server is not None:
        # Only makes hypercorn's `ssl_enabled` true (secure sockets); the context comes from `tls`.
        hconfig.certfile, hconfig.keyfile = str(tls.cert_file), str(tls.key_file)
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("hypercorn.error")
    hconfig.graceful_timeout = GRACEFUL_TIMEOUT_S
    for warning in exposure_warnings(config):
        log.warning("%s", warning)
    return hconfig


def advertised_http_url(config: AgentConfig, advertise_ip: str) -> str:
    """This agent's API as other hosts reach it: scheme://host:port.

    The host is `[http] bind` when it names an address; for a wildcard bind
    (0.0.0.0, ::) it is `advertise_ip`, the address gossip advertises
    (`[cluster] advertise`, else derived from the cluster bind): never the
    unusable 0.0.0.0 that hypercorn reports as bound. The same address the
    other members read from this agent's gossip metadata (NodeMeta.http_url).
    """
    http = config.http
    host = advertise_ip if http.bind in ("0.0.0.0", "::") else http.bind
    return f"{http.scheme}://{_bind_address(host, http.port)}"


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
