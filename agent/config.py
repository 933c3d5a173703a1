"""The gpu-agent's configuration: its sections, their defaults, and what follows from them.

Theory of operation
-------------------
Configuration is data. Each TOML section is one frozen dataclass below; its field
names *are* the file's keys and its type hints *are* the file's schema. The loader
(config_loading.py) walks those fields, so a key cannot exist in the file without
existing in the code, and a misspelt key is an error (with the nearest valid key
suggested) rather than a setting that silently does nothing.

Values come from four layers, each overriding the one before it:

    defaults  <  config file  <  environment  <  command-line flags

`load_config` lays them over each other and only then runs
`AgentConfig.validate()` (config_checks.py), so rules about combinations see
the final values whichever layer set them.

Beside the schema: the defaults that depend on the host (node name, data
directory), which keys a SIGHUP reload may change, and what an API bound
beyond loopback without auth or TLS should warn about.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from agent.config_checks import ConfigError, check_config
from coordinator.queues import QueuePolicy, QueueSpec

DEFAULT_CONFIG_PATH: Final = Path("/etc/gpu-orchestrator/agent.toml")
STATE_SUBDIR: Final = "gpu-orchestrator"
# Appended to a GRAPH_SERVICE_URL that has no path. The Go service took a bare
# base URL (http://localhost:8081) and defined no event path of its own (it
# only read GET <base>/workflow/<id>); /events is the path docs/api.md documents.
GRAPH_EVENTS_PATH: Final = "/events"


@dataclass(frozen=True)
class AgentSection:
    """``[agent]``: who this agent is and where it keeps its state."""

    # The name this agent goes by: in membership, in allocation objects (`node`)
    # and in metric labels (`Hostname`). Defaults to the host name, the name
    # operators already know the machine by. Must be unique within a cluster.
    node_name: str
    # Where the SQLite lease table (WAL) and Raft state live. Defaults to systemd's
    # $STATE_DIRECTORY (set by StateDirectory=, /var/lib/gpu-orchestrator in the
    # shipped unit), else the per-user XDG state directory, so that running the
    # agent by hand never needs root. See `default_data_dir`.
    data_dir: Path
    # The least severe level that is logged: debug, info, warning or error.
    # "info" records lifecycle events (elections, allocations, expiries) without
    # the per-tick detail of "debug".
    log_level: str = "info"
    # Free-form "key=value" labels this agent gossips about itself (rack, zone,
    # owner...), shown in /cluster/members. Kept short: they travel in every
    # membership update, inside the 1 KiB gossip metadata.
    labels: tuple[str, ...] = ()
    # Where this fleet's CUDA MPS control daemons keep their pipes and logs, when
    # GPUs are shared through MPS: a share's allocation object hands them to its
    # holder as CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY hints, with its
    # budget as CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, once either is set ("" for both:
    # no MPS, the hints are null and shares time-slice). The answering leader's
    # values are given, so set them alike on every agent.
    mps_pipe_directory: str = ""
    mps_log_directory: str = ""


@dataclass(frozen=True)
class HttpSection:
    """``[http]``: the HTTP API and ``/metrics`` listener."""

    # Address to listen on. Loopback by default, so an agent started by hand is
    # not an open API on the network (auth is off by default); production configs
    # name an address (or 0.0.0.0) with [auth] enabled, and the agent warns at
    # start and in /healthz while it listens beyond loopback with auth off. Must
    # be an IP address, not a host name, since a name may resolve to several
    # addresses or none.
    bind: str = "127.0.0.1"
    # TCP port of the API and /metrics. 8086 is the seed's port, kept so existing
    # clients and scrape configs work unchanged. Also set by PORT and --port.
    port: int = 8086
    # Largest request body accepted; larger ones get 413. Requests are small JSON
    # documents: 1 MiB leaves ample room for workload_data while bounding what one
    # client can make the agent buffer.
    max_body_bytes: int = 1_048_576
    # PEM certificate chain and private key: set both to serve the API (and
    # /metrics) over HTTPS only. Re-read on SIGHUP, so a renewed certificate
    # needs no restart. Unset: plain HTTP, fine on loopback or a network you trust.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # PEM bundle of the CA(s) that signed the other agents' certificates, used to
    # verify them when this agent forwards to the leader over HTTPS. Unset: the
    # system's trust store. Agents reach each other by IP address, so each
    # certificate must name its agent's advertised IP in subjectAltName.
    tls_ca_file: Path | None = None

    @property
    def tls_enabled(self) -> bool:
        """Whether the API is served over HTTPS (a certificate and key are set)."""
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def scheme(self) -> str:
        """"https" with TLS on, else "http": the scheme of this agent's API URL."""
        return "https" if self.tls_enabled else "http"
    # Every request is answered within this many seconds. A request whose work is
    # not done by then (a stalled disk, a leader that cannot commit, no quorum) gets
    # 503 with Retry-After: `outcome_unknown` for a write that may have been
    # proposed, `timeout` otherwise. At least 3 s: a forwarded request looks for a
    # leader for up to 2.5 s and answers that search's outcome itself (no_leader).
    request_timeout_s: float = 5.0


@dataclass(frozen=True)
class DevicesSection:
    """``[devices]``: where GPU state comes from."""

    # "nvml" reads the host's GPUs through nvidia-ml-py; "simulated" serves the
    # fleet described by `simulate`. NVML by default, and the agent never falls
    # back to a simulation by itself when NVML fails: a host that reports fake
    # GPUs would be scheduled onto.
    backend: str = "nvml"
    # The simulated fleet, e.g. "4xH100-80GB" (same as --simulate). Required with
    # backend = "simulated" and refused with "nvml". Setting it while leaving
    # `backend` unset selects "simulated", as --simulate does.
    simulate: str | None = None
    # Seconds between telemetry samples of every GPU. One second keeps the
    # scheduler's view of memory and utilization fresh, and is far shorter than
    # any Prometheus scrape interval, at the cost of a few NVML calls per GPU.
    sample_interval_s: float = 1.0
    # Seconds one whole telemetry sample may take before it is abandoned and the
    # device backend reported degraded (in /healthz and metrics). Healthy samples
    # take milliseconds; 5 s tolerates a busy driver yet notices a hung one (e.g.
    # a GPU fallen off the bus) quickly.
    nvml_timeout_s: float = 5.0
    # Seconds a GPU must go without a new critical event (XID, double-bit ECC,
    # lost) before it returns to service by itself. Five minutes outlasts the
    # bursts in which such errors come, without costing a GPU-hour per fault.
    health_quiet_period_s: float = 300.0
    # Utilization (%) at or below which a GPU counts as idle: a leased GPU this
    # quiet accrues gpu_orchestrator_lease_idle_seconds; an unleased one busier
    # than this counts as in use without a lease.
    idle_utilization_pct: float = 5.0


@dataclass(frozen=True)
class ClusterSection:
    """``[cluster]``: membership (gossip) and leader election (Raft)."""

    # A server votes in leader elections and keeps a replica of the lease table;
    # a client (false) only gossips and forwards to the leader. True by default
    # because a lone agent must be its own leader.
    server: bool = True
    # Servers to wait for before the first election. 1 = alone, the default, so
    # one agent is a complete orchestrator with no cluster setup. Any odd number
    # >= 1: a cluster of 2k servers needs k+1 votes and so survives no more
    # failures than one of 2k-1, while giving a split vote one more way to happen.
    bootstrap_expect: int = 1
    # Address the gossip (UDP and TCP) and Raft (TCP) listeners bind to.
    bind: str = "0.0.0.0"
    # Address the other agents should use to reach this one; must be an IP
    # address other hosts can route to. Unset: derived from `bind`.
    advertise: str | None = None
    # Gossip port, UDP for probes and TCP for full-state sync. 7946 is the port
    # memberlist-based systems use, so existing firewall conventions carry over.
    gossip_port: int = 7946
    # Raft RPC port (TCP), next to the gossip port.
    raft_port: int = 7947
    # Existing members to contact at start-up, as "host", "host:port" or
    # "[v6addr]:port" (port defaults to gossip_port). Empty: start alone, or
    # wait for another agent to join this one.
    join: tuple[str, ...] = ()
    # File holding the shared cluster key that protects cluster traffic. Unset:
    # traffic is not encrypted, acceptable only on a trusted network, chosen
    # as the default because it needs no key distribution to try the agent out.
    # Format and rotation: docs/membership.md.
    key_file: Path | None = None
    # SWIM timing profile: "lan" (a data-centre network: 1 s probes, suspicion
    # that waits for independent confirmations) or "local" (one host: shorter
    # probe and TCP timeouts, faster push-pull). See docs/membership.md.
    profile: str = "lan"
    # Seconds a host must stay dead or left in gossip, as the leader observes it,
    # before the leader marks the host's leases lost (status "lost", a webhook,
    # gpu_orchestrator_allocations_lost_total) and frees its GPUs in the lease
    # table. Its GPUs leave the schedulable pool at once whatever this says; the
    # grace only guards the *leases*: a host that was merely cut off (a switch or
    # link failure) comes back with its jobs still running, and freeing their GPUs
    # would let a second tenant onto them. 300 s is the time Kubernetes gives an
    # unreachable node's pods (the default tolerationSeconds of the
    # node.kubernetes.io/unreachable taint), and rides out a top-of-rack switch
    # reboot (typically 2-4 min); shorter means lease holders hear sooner and
    # reschedule elsewhere, at the risk of double use after a short partition.
    # 0 = never mark leases lost (they end by release or TTL only) - never
    # "at once": a host is not lost the instant a probe fails. Servers only.
    host_lost_grace_s: float = 300.0
    # A server snapshots its lease table every this many applied log entries and
    # compacts its log to the snapshot before, which also bounds the state file:
    # the log, and the delivered outbox rows it could re-create on a replay, never
    # hold much more than two rounds of it. 10,000 is etcd's SnapshotCount; at
    # least 100 (each snapshot costs a write of the whole table).
    snapshot_every: int = 10_000


@dataclass(frozen=True)
class SchedulerSection:
    """``[scheduler]``: leases and the wait queue."""

    # Lease lifetime for a request that gives no ttl_seconds. A day: a forgotten
    # allocation frees itself by the next day, yet an overnight job is not cut
    # off; longer jobs renew. 0 = leases never expire (then max_ttl_s must be 0).
    default_ttl_s: float = 86400.0
    # Upper bound on any requested or renewed ttl_seconds: 30 days bounds how long
    # a client that died without releasing can strand a GPU. 0 = no bound.
    max_ttl_s: float = 30 * 86400.0
    # Seconds a queued request waits for GPUs before it expires. An hour covers a
    # typical job turnover without letting requests whose client has given up
    # pile up.
    queue_timeout_s: float = 3600.0
    # Most requests waiting at once; beyond it allocate answers 503 queue_full.
    # Bounds the memory and replicated state that a burst of requests can take.
    # 10,000: a decision costs about the same at any depth (the queue is indexed;
    # docs/benchmarks.md "Scale"), so the bound is memory: ~1 KB per request.
    max_queue: int = 10_000
    # Seconds between scheduler ticks (expire leases, time out queued requests,
    # retry placement). Half a second keeps expiry well within a second of its
    # deadline while the tick itself costs next to nothing.
    tick_interval_s: float = 0.5
    # With [queues] declared: how many priority levels a waiting request must be
    # above a running one to preempt it (0: priority alone never preempts;
    # guarantees and fair share still do). 3 keeps routine differences (5 vs 6)
    # from churning leases while an urgent 9 still displaces a batch 5.
    # Reloaded on SIGHUP; the leader's value is the cluster's.
    preemption_priority_gap: int = 3
    # With [queues] declared: priority points a waiting request gains per hour
    # waited, so a stream of higher work cannot starve it (0: no aging).
    # Reloaded on SIGHUP; the leader's value is the cluster's.
    age_weight_per_hour: float = 0.0
    # The ports a gang's rendezvous hint is chosen from (both ends included):
    # the allocation names its first node's address and the lowest port of this
    # range that no other live gang with the same first node holds, for
    # torch.distributed's --master_addr/--master_port. 29500 is torchrun's
    # default port; a hundred ports cover a hundred gangs led from one node.
    # Open them between the GPU hosts. The leader's value is the cluster's.
    rendezvous_port_min: int = 29500
    rendezvous_port_max: int = 29599
    # Requests of at least this many GPUs take, among nodes best fit finds equal
    # in health and GPUs stranded, one where their set is all-NVLink (0 = off, else
    # at least 2). Off: it moves 4-GPU work onto the NVSwitch hosts that 8-GPU jobs
    # and gangs wait for (docs/benchmarks.md, bench_shapes). The leader's value is the cluster's.
    nvlink_first_gpus: int = 0


@dataclass(frozen=True)
class AuthSection:
    """``[auth]``: API keys (see agent/api_keys.py for the keys file)."""

    # Off by default, as in the seed, so existing clients keep working. Turn it on
    # on any network you do not fully trust. /healthz and /metrics stay open.
    enabled: bool = False
    # Header that carries the key; the seed's X-API-Key. "Authorization: Bearer"
    # is accepted as well, always, so this names an additional header.
    header_name: str = "X-API-Key"
    # TOML file mapping keys (by SHA-256) to the service each may act for. Read
    # only when `enabled`, when it must exist.
    keys_file: Path = Path("/etc/gpu-orchestrator/api-keys.toml")
    # A token bucket per API key (per client address while auth is off) in front
    # of every route but /healthz and /metrics: a request takes a token, tokens
    # refill at `rate_per_s` up to `burst`, and an empty bucket answers 429
    # rate_limited with Retry-After. Off by default, like auth, so existing
    # clients and benchmarks are not throttled by surprise.
    rate_limit: bool = False
    # Sustained requests per second each key (or address) may make. 20/s is far
    # above what an allocating client or a status page (1 request/s) needs, yet
    # stops a client in a retry loop from monopolising the leader.
    rate_per_s: float = 20.0
    # Requests a key may make at once after being idle: absorbs a script's burst
    # (gpuctl status + list + members) without a 429.
    burst: int = 40


@dataclass(frozen=True)
class IntegrationsSection:
    """``[integrations]``: optional outside services, each off unless set."""

    # Base URL of the DeepAgents advisor; empty = off. Also DEEPAGENTS_URL.
    deepagents_url: str = ""
    # Seconds to wait for the advisor. Its advice is optional, so a slow advisor
    # must not hold up an allocation: after 2 s the agent decides without it.
    deepagents_timeout_s: float = 2.0
    # URL that allocation lifecycle events are POSTed to; empty = off. Also
    # GRAPH_SERVICE_URL. A URL with a path is used as given; a bare base URL
    # (no path, as the Go service's GRAPH_SERVICE_URL=http://host:8081 was) gets
    # GRAPH_EVENTS_PATH appended (see graph_events_url).
    graph_service_url: str = ""
    # Seconds one webhook delivery attempt may take before it counts as failed.
    webhook_timeout_s: float = 5.0
    # Delivery attempts before a webhook notification is dropped; 10 rides out a
    # receiver's restart without retrying a dead endpoint forever.
    webhook_max_attempts: int = 10


@dataclass(frozen=True)
class AccountingSection:
    """``[accounting]``: GPU-seconds per queue and service (GET /usage, gpuctl usage)."""

    # Days of hourly usage the replicated state keeps. 90 covers a quarter's
    # chargeback; each day adds 24 hours × (queue, service) pairs in use to the
    # snapshot (docs/configuration.md gives the size). The leader's value is the
    # one that counts: it travels in the log, so every server prunes alike.
    retention_days: float = 90.0
    # Seconds between the leader's records of utilized GPU-seconds (one small log
    # entry each, none while nothing is leased). A minute is far finer than any
    # bill and costs one entry a minute; at most this much is lost when the
    # leader changes.
    record_interval_s: float = 60.0


# The one table of tables: `[queues.<name>]`, a queue per name (SPEC "Sharing the
# fleet"). Not a section of fixed keys like the others, so it is parsed on its own
# (config_loading.py `_queue_specs`) into AgentConfig.queues.
QUEUES: Final = "queues"
# The keys of one `[queues.<name>]`, as coordinator/queues.py QueueSpec names them.
QUEUE_KEYS: Final = (
    "parent",
    "guaranteed_gpus",
    "weight",
    "max_gpus",
    "max_priority",
    "borrow",
    "lend",
    "preemption_grace_s",
    "idle_reclaim",
    "services",
    "allow_shares",
    "cross_queue_shares",
)
IDLE_RECLAIM_KEYS: Final = ("utilization_pct", "minutes")


@dataclass(frozen=True)
class AgentConfig:
    """The whole configuration; each field but `queues` is one section of the TOML file."""

    agent: AgentSection
    http: HttpSection = field(default_factory=HttpSection)
    devices: DevicesSection = field(default_factory=DevicesSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    auth: AuthSection = field(default_factory=AuthSection)
    integrations: IntegrationsSection = field(default_factory=IntegrationsSection)
    accounting: AccountingSection = field(default_factory=AccountingSection)
    # `[queues.<name>]`, by name. None declared: one implicit `default` queue and
    # strict priority, as before queues existed. Reloaded on SIGHUP; the leader
    # proposes its own as the cluster's (agent/queue_policy_sync.py).
    queues: tuple[QueueSpec, ...] = ()

    @functools.cached_property
    def queue_policy(self) -> QueuePolicy:
        """The queues and the scheduler's sharing knobs as one policy (valid once `validate` passed)."""
        return QueuePolicy.of(
            self.queues,
            preemption_priority_gap=self.scheduler.preemption_priority_gap,
            age_weight_per_hour=self.scheduler.age_weight_per_hour,
        )

    def validate(self) -> None:
        """Return None if the configuration makes sense; raise ConfigError naming the first bad key."""
        check_config(self)


def graph_events_url(url: str) -> str | None:
    """The URL graph events are POSTed to: None when `url` is empty (off), `url` with
    GRAPH_EVENTS_PATH appended when it has no path (a base URL, as the Go service's
    GRAPH_SERVICE_URL was), else `url` unchanged."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.path in ("", "/") and not parts.query:
        return url.rstrip("/") + GRAPH_EVENTS_PATH
    return url


def listens_beyond_loopback(http: HttpSection) -> bool:
    """Whether [http] bind lets other hosts reach the API (anything but a loopback address)."""
    return not ipaddress.ip_address(http.bind).is_loopback


def exposure_warnings(config: AgentConfig) -> list[str]:
    """What makes this agent's API unsafe to expose, in words for the log and /healthz; [] when nothing."""
    http = config.http
    if not listens_beyond_loopback(http):
        return []
    warnings: list[str] = []
    if not config.auth.enabled:
        warnings.append(
            f"the HTTP API listens on {http.bind}:{http.port}, beyond loopback, with [auth] enabled = false: "
            "anyone who can reach it can allocate and release GPUs (turn auth on, or bind 127.0.0.1)"
        )
    elif not http.tls_enabled:
        warnings.append(
            f"the HTTP API listens on {http.bind}:{http.port}, beyond loopback, without TLS: API keys cross "
            "the network in clear text (set [http] tls_cert_file and tls_key_file)"
        )
    return warnings


def default_node_name() -> str:
    """Return this host's name, the default [agent] node_name."""
    return socket.gethostname()


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """Return the default [agent] data_dir for this environment.

    $STATE_DIRECTORY (systemd's StateDirectory=; when the unit names several,
    systemd joins them with ':' and the first is used), else
    $XDG_STATE_HOME/gpu-orchestrator (ignored when relative, as the XDG Base
    Directory spec requires), else $HOME/.local/state/gpu-orchestrator.
    """
    state_directory = environ.get("STATE_DIRECTORY", "")
    if state_directory:
        return Path(state_directory.split(":")[0])
    xdg_state_home = environ.get("XDG_STATE_HOME", "")
    if xdg_state_home and Path(xdg_state_home).is_absolute():
        return Path(xdg_state_home) / STATE_SUBDIR
    home = environ.get("HOME", "")
    return (Path(home) if home else Path.home()) / ".local" / "state" / STATE_SUBDIR


# --- reloading (SIGHUP) -------------------------------------------------------------

# Keys a running agent applies when it re-reads its configuration on SIGHUP
# (`reloaded`), and every [queues.<name>]. Everything else is bound into
# sockets, files or tasks at start-up.
RELOADABLE_KEYS: Final = frozenset(
    {"agent.log_level", "scheduler.preemption_priority_gap", "scheduler.age_weight_per_hour"}
)


def reloaded(running: AgentConfig, fresh: AgentConfig) -> AgentConfig:
    """`running` with the reloadable keys (and the queues) of `fresh`: the configuration in force after a SIGHUP."""
    scheduler = replace(
        running.scheduler,
        preemption_priority_gap=fresh.scheduler.preemption_priority_gap,
        age_weight_per_hour=fresh.scheduler.age_weight_per_hour,
    )
    return replace(
        running,
        agent=replace(running.agent, log_level=fresh.agent.log_level),
        scheduler=scheduler,
        queues=fresh.queues,
    )


def restart_needed_keys(running: AgentConfig, fresh: AgentConfig) -> list[str]:
    """Return the dotted keys whose value differs between `running` and `fresh` and need a restart."""
    changed: list[str] = []
    for section in section_fields():
        old, new = getattr(running, section.name), getattr(fresh, section.name)
        for key in fields(old):
            dotted = f"{section.name}.{key.name}"
            if dotted not in RELOADABLE_KEYS and getattr(old, key.name) != getattr(new, key.name):
                changed.append(dotted)
    return changed


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" naming the choice nearest to `word`, or "" if none is near."""
    matches = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def section_fields() -> list[Any]:
    """AgentConfig's fields that are sections of fixed keys (all but `queues`)."""
    return [f for f in fields(AgentConfig) if f.name != QUEUES]
