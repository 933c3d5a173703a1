"""Whether a gpu-agent configuration makes sense: one check per section, and across sections.

`AgentConfig.validate()` (config.py) runs `check_config` once every layer
(defaults, file, environment, flags) is laid over the others, so a rule about
a combination (two listeners on one port, a default TTL above its cap) sees the
final values whichever layer set them. Each check raises ConfigError naming
the first bad key as ``[section] key``; config_loading.py adds which layer set it.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from agent.config import (
        AccountingSection,
        AgentConfig,
        AgentSection,
        AuthSection,
        ClusterSection,
        DevicesSection,
        HttpSection,
        IntegrationsSection,
        SchedulerSection,
    )

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
DEVICE_BACKENDS: Final = ("nvml", "simulated")
# SWIM timing profiles (coordinator/swim_config.py): "lan" for real networks,
# "local" for agents on one host (tests, trying a cluster out on a laptop).
GOSSIP_PROFILES: Final = ("lan", "local")
# The shortest [http] request_timeout_s: above the forwarding's 2.5 s search for a leader.
MIN_REQUEST_TIMEOUT_S: Final = 3.0
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}=[A-Za-z0-9._/:-]{0,63}")


class ConfigError(Exception):
    """The configuration is missing, malformed or makes no sense.

    The message is meant for the operator as is: it names the key (as
    ``[section] key``) and, where known, where the value came from. `key` is the
    dotted name (``"http.port"``) of the offending key, or None when the error is
    about the file as a whole.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_config(config: AgentConfig) -> None:
    """Return None if the configuration makes sense; raise ConfigError naming the first bad key."""
    _validate_agent(config.agent)
    _validate_http(config.http)
    _validate_devices(config.devices)
    _validate_cluster(config.cluster)
    _validate_listeners(config.http, config.cluster)
    _validate_scheduler(config.scheduler)
    _validate_auth(config.auth)
    _validate_integrations(config.integrations)
    _validate_accounting(config.accounting)
    _validate_queues(config)


# 128 bytes at most: the SWIM wire format's limit on member names
# (coordinator/swim_messages.py MAX_NAME_BYTES), since every agent gossips.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# RFC 9110 token characters: what a header field name may consist of.
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _fail(key: str, message: str) -> ConfigError:
    section, name = key.split(".")
    return ConfigError(f"[{section}] {name} {message}", key=key)


def _check_port(key: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise _fail(key, f"must be a port in 1..65535, got {port}")


def _check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise _fail(key, f"must be a number greater than 0, got {value}")


def _check_non_negative(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise _fail(key, f"must be a number >= 0 (0 = unlimited), got {value}")


def _check_ip(key: str, address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise _fail(
            key, f"must be an IP address such as 0.0.0.0, 127.0.0.1 or ::, got {address!r}"
        ) from None


def _check_url(key: str, url: str) -> None:
    if url == "":
        return
    try:
        parts = urlsplit(url)
        well_formed = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        well_formed = False
    if not well_formed:
        raise _fail(key, f"must be an http:// or https:// URL, or empty to turn it off; got {url!r}")


def is_node_name(text: str) -> bool:
    """Whether `text` is a valid [agent] node_name (what /cluster/servers accepts as a server's name)."""
    return bool(_NODE_NAME.fullmatch(text))


def _validate_agent(section: AgentSection) -> None:
    if not _NODE_NAME.fullmatch(section.node_name):
        raise _fail(
            "agent.node_name",
            "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {section.node_name!r} (set it with --node-name if the host name does not fit)",
        )
    if str(section.data_dir) in ("", "."):
        raise _fail("agent.data_dir", "must name a directory")
    if section.log_level not in LOG_LEVELS:
        raise _fail("agent.log_level", f"must be one of {', '.join(LOG_LEVELS)}; got {section.log_level!r}")
    keys: set[str] = set()
    for label in section.labels:
        if not _LABEL.fullmatch(label):
            raise _fail(
                "agent.labels",
                f"entry {label!r} is not key=value (key: 1-63 letters, digits, '.', '_', '/', '-'; "
                "value: up to 63 of those or ':')",
            )
        key = label.split("=", 1)[0]
        if key in keys:
            raise _fail("agent.labels", f"names {key!r} twice")
        keys.add(key)
    if len(section.labels) > 16 or sum(len(label) for label in section.labels) > 256:
        raise _fail(
            "agent.labels",
            "must be at most 16 entries of 256 characters in all, to fit in the gossip metadata",
        )


def _validate_http(section: HttpSection) -> None:
    _check_ip("http.bind", section.bind)
    _check_port("http.port", section.port)
    if section.max_body_bytes < 1:
        raise _fail("http.max_body_bytes", f"must be at least 1, got {section.max_body_bytes}")
    # [http] tls_cert_file alone (or the key alone) is a half-done TLS set-up:
    # refuse it rather than serve plain HTTP the operator believes is encrypted.
    _check_readable_pair("http.tls_cert_file", "http.tls_key_file", section.tls_cert_file, section.tls_key_file)
    _check_file("http.tls_cert_file", section.tls_cert_file)
    _check_file("http.tls_key_file", section.tls_key_file)
    _check_file("http.tls_ca_file", section.tls_ca_file)
    if not (math.isfinite(section.request_timeout_s) and section.request_timeout_s >= MIN_REQUEST_TIMEOUT_S):
        raise _fail(
            "http.request_timeout_s",
            f"must be at least {MIN_REQUEST_TIMEOUT_S:g} s (a forwarded request looks for a leader for up to 2.5 s), "
            f"got {section.request_timeout_s}",
        )


def _validate_devices(section: DevicesSection) -> None:
    if section.backend not in DEVICE_BACKENDS:
        raise _fail(
            "devices.backend", f"must be one of {', '.join(DEVICE_BACKENDS)}; got {section.backend!r}"
        )
    if section.backend == "simulated" and not section.simulate:
        raise _fail(
            "devices.backend",
            '= "simulated" needs a fleet: set [devices] simulate (e.g. "4xH100-80GB") or pass --simulate',
        )
    if section.backend == "nvml" and section.simulate is not None:
        raise _fail(
            "devices.simulate",
            f'= {section.simulate!r} contradicts backend = "nvml"; remove one of them',
        )
    _check_positive("devices.sample_interval_s", section.sample_interval_s)
    _check_positive("devices.nvml_timeout_s", section.nvml_timeout_s)
    _check_non_negative("devices.health_quiet_period_s", section.health_quiet_period_s)
    if not 0 <= section.idle_utilization_pct <= 100:
        raise _fail(
            "devices.idle_utilization_pct", f"must be between 0 and 100, got {section.idle_utilization_pct}"
        )


def _validate_cluster(section: ClusterSection) -> None:
    if section.bootstrap_expect < 1 or section.bootstrap_expect % 2 == 0:
        raise _fail(
            "cluster.bootstrap_expect",
            f"must be an odd number >= 1 (1 = alone; an even count tolerates no more failures "
            f"than one server fewer); got {section.bootstrap_expect}",
        )
    _check_ip("cluster.bind", section.bind)
    if section.advertise is not None:
        if _check_ip("cluster.advertise", section.advertise).is_unspecified:
            raise _fail(
                "cluster.advertise",
                f"must be an address other hosts can reach, not {section.advertise!r}",
            )
    _check_port("cluster.gossip_port", section.gossip_port)
    _check_port("cluster.raft_port", section.raft_port)
    if section.profile not in GOSSIP_PROFILES:
        raise _fail(
            "cluster.profile", f"must be one of {', '.join(GOSSIP_PROFILES)}; got {section.profile!r}"
        )
    if not (math.isfinite(section.host_lost_grace_s) and section.host_lost_grace_s >= 0):
        raise _fail(
            "cluster.host_lost_grace_s",
            f"must be a number of seconds >= 0 (0 = never mark a lost host's leases lost), "
            f"got {section.host_lost_grace_s}",
        )
    if section.snapshot_every < 100:
        raise _fail("cluster.snapshot_every", f"must be an integer >= 100 (entries), got {section.snapshot_every}")
    for entry in section.join:
        try:
            split_host_port(entry, section.gossip_port)
        except ValueError as error:
            raise _fail(
                "cluster.join", f"entry {entry!r} is not host, host:port or [v6addr]:port: {error}"
            ) from None


def _binds_overlap(a: str, b: str) -> bool:
    # A wildcard address listens on every interface, so it collides with any
    # address (0.0.0.0 vs ::1 need not in fact collide; we reject it anyway
    # rather than depend on the host's IPv6 dual-stack setting).
    first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return first == second or first.is_unspecified or second.is_unspecified


def _validate_listeners(http: HttpSection, cluster: ClusterSection) -> None:
    # All three listen on TCP (gossip also on UDP), so any two on the same port
    # and an overlapping address would fail to bind at start-up; say so now.
    listeners = (
        ("http.port", http.bind, http.port),
        ("cluster.gossip_port", cluster.bind, cluster.gossip_port),
        ("cluster.raft_port", cluster.bind, cluster.raft_port),
    )
    for (key_a, bind_a, port_a), (key_b, bind_b, port_b) in itertools.combinations(listeners, 2):
        if port_a == port_b and _binds_overlap(bind_a, bind_b):
            other_section, other_name = key_a.split(".")
            raise _fail(
                key_b,
                f"= {port_b} is already [{other_section}] {other_name} on an overlapping "
                "address; every listener needs its own port",
            )


def _validate_scheduler(section: SchedulerSection) -> None:
    _check_non_negative("scheduler.default_ttl_s", section.default_ttl_s)
    _check_non_negative("scheduler.max_ttl_s", section.max_ttl_s)
    if section.max_ttl_s > 0:
        if section.default_ttl_s == 0:
            raise _fail(
                "scheduler.default_ttl_s",
                f"= 0 (never expire) exceeds max_ttl_s = {section.max_ttl_s}; "
                "set max_ttl_s = 0 as well to allow leases that never expire",
            )
        if section.default_ttl_s > section.max_ttl_s:
            raise _fail(
                "scheduler.default_ttl_s",
                f"= {section.default_ttl_s} exceeds max_ttl_s = {section.max_ttl_s}",
            )
    _check_positive("scheduler.queue_timeout_s", section.queue_timeout_s)
    if section.max_queue < 1:
        raise _fail("scheduler.max_queue", f"must be at least 1, got {section.max_queue}")
    _check_positive("scheduler.tick_interval_s", section.tick_interval_s)
    if section.preemption_priority_gap < 0:
        raise _fail(
            "scheduler.preemption_priority_gap",
            f"must be an integer >= 0 (0 = priority alone never preempts), got {section.preemption_priority_gap}",
        )
    if not (math.isfinite(section.age_weight_per_hour) and section.age_weight_per_hour >= 0):
        raise _fail(
            "scheduler.age_weight_per_hour",
            f"must be a number >= 0 (0 = no aging), got {section.age_weight_per_hour}",
        )
    for name in ("rendezvous_port_min", "rendezvous_port_max"):
        port = getattr(section, name)
        if not 1 <= port <= 65535:
            raise _fail(f"scheduler.{name}", f"must be a port number (1-65535), got {port}")
    if section.rendezvous_port_min > section.rendezvous_port_max:
        raise _fail(
            "scheduler.rendezvous_port_min",
            f"= {section.rendezvous_port_min} is above rendezvous_port_max = {section.rendezvous_port_max}",
        )
    if section.nvlink_first_gpus < 0 or section.nvlink_first_gpus == 1:
        raise _fail(
            "scheduler.nvlink_first_gpus",
            f"must be 0 (off) or a GPU count of at least 2, got {section.nvlink_first_gpus}",
        )


def _validate_queues(config: AgentConfig) -> None:
    # Each spec checked its own keys when it was built (`_queue_specs`); what is
    # left is how they fit together: parents declared, one level, services mapped once.
    try:
        config.queue_policy
    except ValueError as error:
        raise ConfigError(f"[queues] {error}", key="queues") from None


def _check_readable_pair(cert_key: str, key_key: str, cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        missing, given = (key_key, cert_key) if key is None else (cert_key, key_key)
        raise _fail(missing, f"must be set as well: {given.replace('.', '] ', 1)} alone cannot serve TLS")


def _check_file(key: str, path: Path | None) -> None:
    if path is not None and not path.is_file():
        raise _fail(key, f"= {str(path)!r} is not a readable file")


def _validate_auth(section: AuthSection) -> None:
    # Checked even while rate_limit is off, so turning it on never reveals a typo late.
    _check_positive("auth.rate_per_s", section.rate_per_s)
    if section.burst < 1:
        raise _fail("auth.burst", f"must be at least 1 (one request at a time), got {section.burst}")
    if not _HEADER_TOKEN.fullmatch(section.header_name):
        raise _fail("auth.header_name", f"must be an HTTP header name, got {section.header_name!r}")
    if section.header_name.lower() == "authorization":
        raise _fail(
            "auth.header_name",
            "must not be Authorization: 'Authorization: Bearer <key>' is always accepted; "
            "header_name names an additional header",
        )
    if str(section.keys_file) in ("", "."):
        raise _fail("auth.keys_file", "must name a file")


def _validate_integrations(section: IntegrationsSection) -> None:
    _check_url("integrations.deepagents_url", section.deepagents_url)
    _check_positive("integrations.deepagents_timeout_s", section.deepagents_timeout_s)
    _check_url("integrations.graph_service_url", section.graph_service_url)
    _check_positive("integrations.webhook_timeout_s", section.webhook_timeout_s)
    if section.webhook_max_attempts < 1:
        raise _fail(
            "integrations.webhook_max_attempts", f"must be at least 1, got {section.webhook_max_attempts}"
        )


def _validate_accounting(section: AccountingSection) -> None:
    # At least a day: the table refuses a retention under an hour, and a day keeps /usage useful.
    if not (math.isfinite(section.retention_days) and section.retention_days >= 1):
        raise _fail("accounting.retention_days", f"must be at least 1 (day), got {section.retention_days}")
    if not (math.isfinite(section.record_interval_s) and 1 <= section.record_interval_s <= 3600):
        raise _fail(
            "accounting.record_interval_s", f"must be between 1 and 3600 seconds, got {section.record_interval_s}"
        )


# What split_host_port takes for a port: digits only (int() would also take "+80" or " 80").
_PORT_TEXT = re.compile(r"[0-9]{1,5}")


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """Split "host", "host:port", "[v6addr]" or "[v6addr]:port" into (host, port).

    A bare IPv6 address without brackets is taken as a host with `default_port`.
    Returns the host (without brackets) and the port; raises ValueError, with the
    reason, for an empty host, an unclosed bracket or a port outside 1..65535.
    """
    port_text: str | None
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError("unclosed '['")
        host, rest = address[1:end], address[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']'")
        port_text = rest[1:] if rest else None
    elif address.count(":") == 1:
        host, port_text = address.split(":")
    else:
        host, port_text = address, None
    if not host.strip():
        raise ValueError("empty host")
    if port_text is None:
        return host, default_port
    if not _PORT_TEXT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not in 1..65535")
    return host, int(port_text)


# --- defaults ----------------------------------------------------------------------
