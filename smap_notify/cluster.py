"""Redis Cluster: which node to subscribe on, and a watch that says when to leave it.

A classic ``PUBLISH`` reaches every node of a cluster, so any live node serves the
subscription. ``NodeLocator.find`` asks the nodes in turn (REDIS_HOST's, then those
their ``CLUSTER NODES`` names) and takes the first that answers; a thread of its own
asks another node every ``WATCH_INTERVAL`` how it sees the chosen one, so that a node
the cluster failed or forgot while it stays up is left too. ``survey`` hands the whole
view (each master's slots) to the sharded subscriber (shard_subscriber.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Final

import attrs
import redis
import trio

from .config import Config
from .redis_client import (
    PASSWORD_HINT,
    REDIS_FAILURES,
    fail_fast_client,
    reconnect_delay,
    sleep_in_thread,
)

logger = logging.getLogger(__name__)

WATCH_INTERVAL: Final = 1.0


class NodeNotFound(redis.ConnectionError):
    """No node of the cluster answered."""


@attrs.frozen
class NodeAddress:
    host: str
    port: int
    # The node's cluster id ("" until it answered): how other nodes' views name it,
    # whatever address REDIS_HOST gave for it.
    id: str = attrs.field(default="", eq=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def pair(self) -> tuple[str, int]:
        return self.host, self.port


@attrs.frozen
class Node:
    """One line of ``CLUSTER NODES``."""

    id: str
    address: NodeAddress | None  # None: the node has no address yet (noaddr, handshake)
    flags: frozenset[str]
    slots: tuple[tuple[int, int], ...] = ()  # the ranges it serves (first, last), a master's

    @property
    def failed(self) -> bool:
        # "fail" is the cluster's verdict (a majority of masters agreed); "fail?" (pfail)
        # is one node's suspicion and is not acted on.
        return "fail" in self.flags


def parse_nodes(text: str) -> list[Node]:
    """``CLUSTER NODES``: ``<id> <ip:port@cport[,hostname]> <flags> ...`` per line.

    Raises ``redis.InvalidResponse`` for text that is not such a list.
    """
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) < 8 or "@" not in parts[1]:
            raise redis.InvalidResponse(
                f"not an answer to CLUSTER NODES ({line[:80]!r}): is REDIS_HOST a cluster node?"
            )
        endpoint, _, rest = parts[1].partition("@")
        hostname = rest.partition(",")[2]
        host, _, port = endpoint.rpartition(":")
        flags = frozenset(parts[2].split(","))
        address = None
        if (hostname or host) and port.isdigit() and int(port) and not flags & _NO_ADDRESS:
            address = NodeAddress(hostname or host.strip("[]"), int(port), parts[0])
        nodes.append(Node(parts[0], address, flags, _slot_ranges(parts[8:])))
    return nodes


def _slot_ranges(fields: list[str]) -> tuple[tuple[int, int], ...]:
    """``0-5460`` or ``5461``; a slot being imported or migrated (``[93->-id]``) is still
    served by the node that lists it plainly."""
    out = []
    for field in fields:
        first, _, last = field.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            out.append((int(first), int(last or first)))
    return tuple(out)


_NO_ADDRESS: Final = frozenset({"noaddr", "handshake"})


class NodeLocator:
    """The cluster node to subscribe on. Thread-safe: the subscriber, the health PING and
    the watch thread share one."""

    name = "cluster"

    def __init__(self, config: Config, *, socket_timeout: float) -> None:
        self._config = config
        self._socket_timeout = socket_timeout
        self._seeds = [NodeAddress(host, port) for host, port in config.redis_addresses]
        self._lock = threading.Lock()
        self._clients: dict[NodeAddress, redis.Redis] = {}
        self._learnt: list[NodeAddress] = []  # the live nodes of the last view
        self._chosen: NodeAddress | None = None  # the last node find() took
        self._current: NodeAddress | None = None  # None once the watch saw it fail
        self._why = ""

    def describe(self, address: object) -> str:
        """The log lines' ``redis=`` value: the node, or REDIS_HOST's before one answered."""
        return f"{address or ','.join(map(str, self._seeds))} cluster=true"

    def current(self) -> NodeAddress | None:
        """The node to be subscribed on; None once the cluster failed or forgot it."""
        return self._current

    def moved(self, named: object) -> str:
        """Why the subscriber must leave its node (``current()`` changed)."""
        return self._why or f"the cluster node changed to {named}"

    def find(self, between: Callable[[], None] = lambda: None) -> NodeAddress:
        """Take the first node that answers, the last one taken tried last.

        Raises ``NodeNotFound`` naming each node's error when none answers.
        """
        chosen, _ = self.survey(between)
        with self._lock:
            self._chosen = self._current = chosen
            self._why = ""
        return chosen

    def survey(
        self, between: Callable[[], None] = lambda: None, prefer: Iterable[NodeAddress] = ()
    ) -> tuple[NodeAddress, list[Node]]:
        """The first node that answers ``CLUSTER NODES`` (those in ``prefer`` first), with
        its id, and the cluster as it sees it.

        Raises ``NodeNotFound`` naming each node's error when none answers.
        """
        errors: list[str] = []
        candidates = self._candidates()
        first = [a for a in prefer if a in candidates]
        for candidate in dict.fromkeys([*first, *candidates]):
            between()
            try:
                nodes = self._ask(candidate)
            except REDIS_FAILURES as exc:
                hint = PASSWORD_HINT if isinstance(exc, redis.AuthenticationError) else ""
                errors.append(f"{candidate}: {type(exc).__name__}: {exc}{hint}")
                continue
            me = next((n for n in nodes if "myself" in n.flags), None)
            if me is None:
                errors.append(f"{candidate}: not in its own CLUSTER NODES")
                continue
            with self._lock:
                self._learn(nodes)
            return attrs.evolve(candidate, id=me.id), nodes
        raise NodeNotFound(f"no Redis Cluster node answered ({'; '.join(errors)})")

    def probe_address(self) -> NodeAddress:
        """The node the /health PING goes to: the subscribed one, else one that answers."""
        current = self._current
        if current is not None:
            return current
        for candidate in self._candidates():
            try:
                self._client(candidate).ping()
            except REDIS_FAILURES:
                continue
            return candidate
        raise NodeNotFound("no Redis Cluster node answered a PING")

    def _candidates(self) -> list[NodeAddress]:
        with self._lock:
            known = list(dict.fromkeys([*self._learnt, *self._seeds]))
            chosen = self._chosen
        # After a loss the other nodes come first: the lost one is most likely still down.
        if chosen in known:
            known.remove(chosen)
            known.append(chosen)
        return known

    def _learn(self, nodes: list[Node]) -> None:
        self._learnt = sorted(
            (n.address for n in nodes if n.address is not None and not n.failed),
            key=lambda a: (a.host, a.port),
        )

    def _client(self, address: NodeAddress) -> redis.Redis:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = fail_fast_client(
                    address.host,
                    address.port,
                    password=self._config.redis_password,
                    tls=self._config.redis_use_tls,
                    socket_timeout=self._socket_timeout,
                )
            return client

    def _ask(self, address: NodeAddress) -> list[Node]:
        try:
            # Two words: redis-py parses "CLUSTER NODES" into a dict that drops the flags.
            text = self._client(address).execute_command("CLUSTER", "NODES")
        except redis.ResponseError as exc:
            if "cluster support disabled" in str(exc).lower():
                raise redis.ResponseError(
                    f"{exc}: {address} is not a cluster node (REDIS_CLUSTER=true?)"
                ) from None
            raise
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str):
            raise redis.InvalidResponse("not an answer to CLUSTER NODES: is it a cluster node?")
        return parse_nodes(text)

    def watch(self) -> None:
        """Every WATCH_INTERVAL, ask another node whether the chosen one failed or left
        the cluster, until cancelled (run in a thread of its own)."""
        failures = 0
        while True:
            trio.from_thread.check_cancelled()
            current = self._current
            if current is not None and current.id:
                try:
                    self._check(current)
                    failures = 0
                except NodeNotFound as exc:
                    failures += 1
                    if failures % 30 == 1:
                        logger.warning("cluster watch found no other node error=%s", exc)
            sleep_in_thread(WATCH_INTERVAL if failures == 0 else reconnect_delay(failures, 0))

    def _check(self, current: NodeAddress) -> None:
        others = [other for other in self._candidates() if other != current]
        for other in others:
            trio.from_thread.check_cancelled()
            try:
                nodes = self._ask(other)
            except REDIS_FAILURES:
                continue
            seen = next((n for n in nodes if n.id == current.id), None)
            if seen is not None and not seen.failed:
                with self._lock:
                    self._learn(nodes)
                return
            why = "failed" if seen is not None else "is no longer in the cluster"
            with self._lock:
                self._learn(nodes)
                if self._current is current:
                    self._current = None
                    self._why = f"node {current} {why} (says {other})"
            logger.warning("redis cluster node left node=%s reason=%s by=%s", current, why, other)
            return
        if others:  # a cluster of one node has no one else to ask
            raise NodeNotFound("no other node answered CLUSTER NODES")

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.close()
