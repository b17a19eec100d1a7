"""Redis Sentinel: where the master is, and a watch on the sentinels' ``+switch-master``.

The subscriber and the health PING ask ``MasterLocator`` for the master before each
connect; a thread of its own keeps one sentinel's ``+switch-master`` subscription (the
next sentinel when that one fails), so that a subscriber still on a master that was
demoted but stays up learns it must move.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import redis
import trio

from .config import Config
from .redis_client import REDIS_FAILURES, fail_fast_client, reconnect_delay, sleep_in_thread
from .subscriber import DEAD_AFTER, PROBE_AFTER

logger = logging.getLogger(__name__)

SWITCH_CHANNEL: Final = "+switch-master"
WATCH_POLL: Final = 0.25


class MasterNotFound(redis.ConnectionError):
    """No sentinel answered with a master that is up."""


@attrs.frozen
class MasterAddress:
    host: str
    port: int
    # The sentinels' configuration epoch: it grows with each failover, so of two answers
    # the one with the larger epoch is the newer (a sentinel may lag for a few seconds).
    epoch: int = attrs.field(eq=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def pair(self) -> tuple[str, int]:
        return self.host, self.port


def ask(client: redis.Redis, name: str) -> tuple[MasterAddress, bool]:
    """A sentinel's master named ``name``, and whether that sentinel sees it up."""
    try:
        state: dict[str, Any] = client.sentinel_master(name)  # type: ignore[assignment]
    except redis.ResponseError as exc:
        if "no such master" in str(exc).lower():
            raise redis.ResponseError(f"{exc} (REDIS_SENTINEL_MASTER?)") from None
        raise
    try:
        address = MasterAddress(str(state["ip"]), int(state["port"]), int(state["config-epoch"]))
        up = bool(state["is_master"]) and not state["is_sdown"] and not state["is_odown"]
    except (KeyError, TypeError, ValueError) as exc:
        raise redis.InvalidResponse(
            f"not a sentinel's answer to SENTINEL MASTER (no {exc}): is it a sentinel?"
        ) from None
    return address, up


def parse_switch(data: bytes) -> tuple[str, MasterAddress] | None:
    """``+switch-master``'s ``<name> <old-ip> <old-port> <new-ip> <new-port>``; None if not."""
    parts = data.decode("utf-8", "replace").split(" ")
    if len(parts) != 5 or not parts[4].isdigit():
        return None
    return parts[0], MasterAddress(parts[3], int(parts[4]), -1)


class MasterLocator:
    """The master named ``REDIS_SENTINEL_MASTER``, as the sentinels say. Thread-safe:
    the subscriber, the health PING and the watch thread share one."""

    def __init__(self, config: Config, *, socket_timeout: float) -> None:
        self.name = config.redis_sentinel_master
        self._sentinels = [
            (
                f"{host}:{port}",
                fail_fast_client(
                    host,
                    port,
                    password=config.redis_sentinel_password,
                    tls=config.redis_use_tls,
                    socket_timeout=socket_timeout,
                ),
            )
            for host, port in config.redis_sentinel_addresses
        ]
        self._first = 0  # the sentinel that answered last is asked first
        self._lock = threading.Lock()
        self._known: MasterAddress | None = None
        self._watching = False  # the watch thread's current sentinel answered

    def current(self) -> MasterAddress | None:
        """The master last learnt, without asking anyone."""
        return self._known

    def moved(self, named: object) -> str:
        return f"the sentinels moved the master to {named}"

    def describe(self, address: object) -> str:
        return f"{address or 'unknown'} sentinel_master={self.name}"

    def probe_address(self) -> MasterAddress:
        return self.current() or self.find()

    def find(self, between: Callable[[], None] = lambda: None) -> MasterAddress:
        """Ask the sentinels in turn for the master; ``between`` runs before each.

        Raises ``MasterNotFound`` naming each sentinel's answer when none names a master
        that is up.
        """
        errors: list[str] = []
        count = len(self._sentinels)
        start = self._first
        for i in range(count):
            index = (start + i) % count
            label, client = self._sentinels[index]
            between()
            try:
                address, up = ask(client, self.name)
            except REDIS_FAILURES as exc:
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            if not up:
                errors.append(f"{label}: master {address} is down")
                continue
            self._first = index
            return self.learn(address)
        raise MasterNotFound(
            f"no sentinel named a master {self.name!r} that is up ({'; '.join(errors)})"
        )

    def learn(self, address: MasterAddress) -> MasterAddress:
        """Take ``address`` unless a newer one is known; returns the one kept."""
        with self._lock:
            known = self._known
            if known is None or address.epoch >= known.epoch:
                self._known = known = address
            return known

    def watch(self) -> None:
        """Follow ``+switch-master`` on one sentinel after the other, until cancelled
        (run in a thread of its own)."""
        failures = 0  # attempts in a row that did not get to watch
        while True:
            trio.from_thread.check_cancelled()
            index = self._first
            label, client = self._sentinels[index]
            self._watching = False
            try:
                self._watch_one(label, client)
            except REDIS_FAILURES as exc:
                watching = self._watching
                failures = 0 if watching else failures + 1
                if watching or failures % 30 == 1:
                    logger.warning(
                        "sentinel watch %s, trying the next sentinel=%s error=%s: %s",
                        "lost" if watching else "failed",
                        label,
                        type(exc).__name__,
                        exc,
                    )
            if self._first == index:  # it failed: the next one, whatever find() does
                self._first = (index + 1) % len(self._sentinels)
            sleep_in_thread(reconnect_delay(failures, 0))

    def _watch_one(self, label: str, client: redis.Redis) -> None:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(SWITCH_CHANNEL)
            # A switch made while no sentinel was watched is in its state.
            address, up = ask(client, self.name)
            if up:
                self.learn(address)
            self._watching = True
            logger.info("sentinel watch started sentinel=%s sentinel_master=%s", label, self.name)
            last_rx = probed_at = time.monotonic()
            while True:
                trio.from_thread.check_cancelled()
                message = pubsub.get_message(timeout=WATCH_POLL)
                now = time.monotonic()
                if message is None:
                    if now - last_rx > DEAD_AFTER:
                        raise redis.ConnectionError(f"no reply for {now - last_rx:.1f}s")
                    if now - last_rx > PROBE_AFTER and now - probed_at > PROBE_AFTER:
                        pubsub.ping()
                        probed_at = now
                    continue
                last_rx = now
                if message.get("type") == "message":
                    self._switched(client, message["data"])
        finally:
            try:
                pubsub.close()
            except Exception:  # closing a broken connection must not hide why it broke
                logger.debug("closing sentinel connection failed", exc_info=True)

    def _switched(self, client: redis.Redis, data: bytes) -> None:
        parsed = parse_switch(data)
        if parsed is None or parsed[0] != self.name:
            return
        # The event carries no epoch: the sentinel that sent it has the new one.
        kept = self.learn(ask(client, self.name)[0])
        logger.warning(
            "redis master switched sentinel_master=%s master=%s announced=%s",
            self.name,
            kept,
            parsed[1],
        )

    def close(self) -> None:
        for _, client in self._sentinels:
            client.close()
