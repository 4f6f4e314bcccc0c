"""HTTPS on the gateway's own listener (``server.tls_cert_file``, ``server.tls_key_file``).

Where an ingress or a load balancer terminates TLS (the Helm chart, most container platforms) the gateway speaks
plain HTTP behind it; these settings are for a gateway that faces its clients itself. One server ``SSLContext``
serves every connection; a config reload loads the certificate again into the same context, so new connections
get a renewed certificate with no restart and the ones open keep theirs. The config watcher watches the two
files too: a certificate renewed in place (cert-manager, certbot) is picked up within
``server.config_watch_interval``. Turning TLS on or off needs a restart.
"""
from __future__ import annotations

import os
import ssl

__all__ = ["server_context", "load_into", "tls_problem"]


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context with the certificate chain and key loaded: TLS 1.2 or later, HTTP/1.1 by ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    load_into(context, cert_file, key_file)
    return context


def load_into(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """(Re)load the certificate chain and its key; the connections made after this get them."""
    context.load_cert_chain(cert_file, key_file)


def tls_problem(cert_file: str | None, key_file: str | None) -> tuple[str, str] | None:
    """What is wrong with the pair, as (the key of the setting, a message), or None: both or neither must be set,
    and they must load (readable, PEM, the key matching the certificate)."""
    if not cert_file and not key_file:
        return None
    if not cert_file:  # (the problem is named by the one that is set: it has a line in the file)
        return "tls_key_file", "tls_key_file is set without tls_cert_file: set both, or neither for plain HTTP"
    if not key_file:
        return "tls_cert_file", "tls_cert_file is set without tls_key_file: set both, or neither for plain HTTP"
    for key, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        if not os.path.isfile(path):
            return key, f"no such file: {path}"
    try:
        server_context(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        return "tls_cert_file", f"the certificate and key do not load ({exc}): PEM files, the key matching the " \
                                f"certificate ({cert_file}, {key_file})"
    return None
