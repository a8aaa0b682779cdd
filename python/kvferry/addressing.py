"""Where an engine's kvferry agents listen and what its offers advertise, as NixlConnector does
it (so llm-d's manifests, which set ``VLLM_NIXL_SIDE_CHANNEL_HOST`` to the pod IP, work as they
are):

- advertised host: ``kv_connector_extra_config.host``, else ``VLLM_NIXL_SIDE_CHANNEL_HOST``, else
  ``127.0.0.1``. An unspecified address (``0.0.0.0``, ``::``) is bound as given and the engine
  advertises ``VLLM_HOST_IP`` or this host's primary address instead (a decoder cannot dial
  ``0.0.0.0``).
- bound host: ``bind_host``, else loopback when the advertised host is a loopback address, else
  every interface (a pod's own IP and any other route reach it; the token guards it, and without
  one the agent refuses a non-loopback listener unless ``insecure``).
- port of a rank: base + data-parallel index × TP size + TP rank, base from ``port``, else
  ``VLLM_NIXL_SIDE_CHANNEL_PORT``, else NixlConnector's 5600 when more than one rank must be found
  (TP > 1 or DP > 1), else any free port. The Rust core adds the TP rank; the offset for the
  data-parallel index is added here.
- ``kv_role: kv_consumer`` (a decode-only engine): nothing of it is reachable by peers, so it
  listens on loopback on any free port and needs none configured.

Pure functions of the configuration and the environment, so they are tested without vLLM.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

NIXL_DEFAULT_PORT = 5600


@dataclass(frozen=True)
class Addresses:
    advertise: str
    bind: str
    # The port of TP rank 0 of this data-parallel rank; None: any free port.
    base_port: int | None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


def primary_address(env: Mapping[str, str]) -> str:
    """``VLLM_HOST_IP`` when set (vLLM's own override), else the source address of a route out
    (no packet is sent), else the hostname's address."""
    if env.get("VLLM_HOST_IP"):
        return env["VLLM_HOST_IP"]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only
            return s.getsockname()[0]
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def side_channel(
    extra: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    kv_role: str | None = "kv_both",
    tp_size: int = 1,
    dp_index: int = 0,
    dp_size: int = 1,
) -> Addresses:
    env = os.environ if env is None else env
    if kv_role == "kv_consumer":
        # Decoders dial out; no peer needs to reach them.
        return Addresses(advertise="127.0.0.1", bind=str(extra.get("bind_host", "127.0.0.1")), base_port=None)
    host = str(extra.get("host") or env.get("VLLM_NIXL_SIDE_CHANNEL_HOST") or "127.0.0.1")
    if _is_unspecified(host):
        bind = str(extra.get("bind_host") or host or "0.0.0.0")
        advertise = primary_address(env)
    else:
        advertise = host
        bind = str(extra.get("bind_host") or ("127.0.0.1" if _is_loopback(host) else "0.0.0.0"))
    raw = extra.get("port") or env.get("VLLM_NIXL_SIDE_CHANNEL_PORT")
    if raw:
        base = int(raw)
    elif tp_size > 1 or dp_size > 1:
        base = NIXL_DEFAULT_PORT
    else:
        base = None
    if base is not None:
        base += dp_index * tp_size
        if not 0 < base or base + tp_size - 1 > 65535:
            raise ValueError(
                f"kvferry: the side-channel ports {base}..{base + tp_size - 1} (base + data-parallel "
                f"index {dp_index} x TP size {tp_size} + TP rank) are out of range"
            )
    return Addresses(advertise=advertise, bind=bind, base_port=base)
