"""What a 200 from ``/events`` guarantees, and the wait that makes it so (``MQSA_ACK``).

``memory`` (the default)
    The events are applied in Redis's memory. On disk they follow the server's own
    setting: with the shipped ``appendonly yes`` + ``appendfsync always`` they are on
    disk before Redis answers (nothing acknowledged is lost on a crash); with Redis's
    default ``appendfsync everysec`` a crash of the node can lose about the last
    second of acknowledged events.
``disk``
    The service confirms that the events are in Redis's append-only file on disk
    before it answers: on Redis >= 7.2 with ``WAITAOF 1 <replicas> <timeout>`` after
    the writes, on the same connection; on older Redis only when the server runs
    ``appendonly yes`` + ``appendfsync always`` (checked at the first write; the
    service refuses the mode otherwise, since it could not keep its promise).
``MQSA_ACK_REPLICAS=k``
    Also wait until k replicas have the events (``WAIT``, or ``WAITAOF`` on >= 7.2,
    which then means on the replicas' disks too).

A wait that times out (``MQSA_ACK_TIMEOUT_MS``) answers 503: the events are applied
in memory but not confirmed; resending with the same event ids is safe. Not offered
on Redis Cluster (each user's call goes to its own node and connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mqsa.errors import ConfigError, StoreUnavailable


@dataclass(frozen=True)
class AckPolicy:
    """The settings: what to wait for before answering."""

    ack: Literal["memory", "disk"] = "memory"
    replicas: int = 0
    timeout_ms: int = 1000

    @property
    def waits(self) -> bool:
        return self.ack == "disk" or self.replicas > 0


@dataclass(frozen=True)
class AckPlan:
    """How the policy is kept on this server: the command sent after the writes, if any.

    Attributes:
        command: e.g. ``("WAITAOF", 1, 0, 1000)`` or ``("WAIT", 1, 1000)``; None: no wait.
        guarantee: one sentence for the log: what a 200 means here.
    """

    command: tuple[Any, ...] | None
    guarantee: str

    def check(self, reply: Any, policy: AckPolicy) -> None:
        """Raise StoreUnavailable when the wait's reply falls short of the policy."""
        if self.command is None:
            return
        if self.command[0] == "WAITAOF":
            local, replicas = int(reply[0]), int(reply[1])
            ok = local >= 1 and replicas >= policy.replicas
        else:
            local, replicas, ok = 1, int(reply), int(reply) >= policy.replicas
        if not ok:
            raise StoreUnavailable(
                f"the events are applied but not confirmed within {policy.timeout_ms} ms (on disk: "
                f"{local >= 1}, replicas: {replicas} of {policy.replicas}); resend with the same event ids"
            )


def version_of(info: dict[str, Any]) -> tuple[int, ...]:
    """``INFO server``'s redis_version as a tuple: "7.0.15" -> (7, 0, 15)."""
    return tuple(int(p) for p in str(info.get("redis_version", "0")).split(".") if p.isdigit())


def disk_note(config: dict[str, str] | None) -> str:
    """Where an applied event is, given the server's append-only settings."""
    if config is None:
        return "in memory (the server's disk settings are unknown: CONFIG is refused)"
    if config.get("appendonly") != "yes":
        return "in memory only (no append-only file: at most the last snapshot survives a crash)"
    return {
        "always": "on disk (appendfsync always)",
        "everysec": "in memory, on disk within about a second (appendfsync everysec)",
    }.get(config.get("appendfsync", ""), "in memory, on disk when the OS flushes (appendfsync no)")


def plan(
    policy: AckPolicy, version: tuple[int, ...], config: dict[str, str] | None, cluster: bool
) -> AckPlan:
    """Choose the wait for ``policy`` on a server of ``version`` with ``config`` (None: CONFIG refused).

    Raises:
        ConfigError: the policy cannot be kept on this server.
    """
    fsync_always = (
        bool(config) and config.get("appendonly") == "yes" and config.get("appendfsync") == "always"
    )
    if cluster and policy.waits:
        raise ConfigError("MQSA_ACK=disk and MQSA_ACK_REPLICAS are not supported on Redis Cluster")
    if policy.ack == "disk" and version >= (7, 2):
        return AckPlan(("WAITAOF", 1, policy.replicas, policy.timeout_ms), "applied and on disk (WAITAOF)")
    if policy.ack == "disk" and not fsync_always:
        shown = (
            "unknown (CONFIG refused)"
            if config is None
            else f"{config.get('appendonly')}/{config.get('appendfsync')}"
        )
        raise ConfigError(
            "MQSA_ACK=disk needs Redis >= 7.2 (WAITAOF) or appendonly yes + appendfsync always; "
            f"this Redis is {'.'.join(map(str, version))} with appendonly/appendfsync {shown}"
        )
    on_disk = disk_note(config)
    if policy.replicas:
        return AckPlan(
            ("WAIT", policy.replicas, policy.timeout_ms),
            f"applied {on_disk}, and on {policy.replicas} replicas",
        )
    return AckPlan(None, f"applied {on_disk}")
