"""Sharded Pub/Sub (REDIS_PUBSUB=sharded): which master each channel is subscribed on.

A channel belongs to the hash slot of its name, and ``SSUBSCRIBE`` is served only by
the master owning that slot; Redis refuses one command naming channels of two slots
(CROSSSLOT). ``SlotMap`` reads the owners off ``CLUSTER NODES``, ``slot_batches`` groups
channels into commands, and ``Placement`` keeps, for the subscriber thread, where each
wanted channel is and which were lost (their users get a ``resync`` once they are back).
Pure: fed the map and the time, no sockets.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Final

import attrs
from redis.crc import key_slot

from .cluster import Node, NodeAddress

# Channels per SSUBSCRIBE or SUNSUBSCRIBE command (all of one slot).
SLOT_BATCH: Final = 1000


def channel_slot(name: str) -> int:
    """The hash slot of channel ``name`` (CRC16 of the name, or of its ``{hash tag}``)."""
    return key_slot(name.encode("utf-8", "surrogateescape"))


def slot_batches(names: Iterable[str]) -> list[list[str]]:
    """Commands' channel lists: one slot each, at most SLOT_BATCH channels."""
    by_slot: dict[int, list[str]] = defaultdict(list)
    for name in names:
        by_slot[channel_slot(name)].append(name)
    return [
        names[i : i + SLOT_BATCH]
        for _, names in sorted(by_slot.items())
        for i in range(0, len(names), SLOT_BATCH)
    ]


@attrs.frozen
class ShardNode:
    """One master as /health shows it."""

    node: str  # host:port
    up: bool  # subscribed on (its connection is open)
    channels: int  # channels Redis confirmed there
    error: str  # why it is down


@attrs.frozen
class Owner:
    address: NodeAddress
    failed: bool  # the cluster's verdict: its replica is about to take its slots


@attrs.frozen
class SlotMap:
    """The masters serving the slots, as one node saw them."""

    _firsts: tuple[int, ...]
    _ranges: tuple[tuple[int, int, Owner], ...]

    @classmethod
    def from_nodes(cls, nodes: Iterable[Node]) -> SlotMap:
        ranges = sorted(
            (first, last, Owner(node.address, node.failed))
            for node in nodes
            if node.address is not None and "master" in node.flags
            for first, last in node.slots
        )
        return cls(tuple(r[0] for r in ranges), tuple(ranges))

    def owner(self, slot: int) -> Owner | None:
        """The master serving ``slot``; None for a slot no master serves."""
        i = bisect.bisect_right(self._firsts, slot) - 1
        if i >= 0 and self._ranges[i][1] >= slot:
            return self._ranges[i][2]
        return None

    def masters(self) -> list[NodeAddress]:
        return list(dict.fromkeys(r[2].address for r in self._ranges))


@attrs.define
class Placement:
    """Where each wanted channel has been asked for (``SSUBSCRIBE`` sent there), which of
    those Redis confirmed, and since when each lost one may have missed messages.

    Owned by the subscriber thread, which consults it every turn: what a turn asks costs
    in proportion to the channels not placed, not to all of them.
    """

    wanted: dict[str, int] = attrs.Factory(dict)  # channel: its slot
    on: dict[str, NodeAddress] = attrs.Factory(dict)
    unplaced: set[str] = attrs.Factory(set)  # wanted, not on any node
    confirmed: set[str] = attrs.Factory(set)
    # Lost (or accepted while unavailable): wall clock since when messages may be missed.
    missed: dict[str, float] = attrs.Factory(dict)
    unavailable: set[str] = attrs.Factory(set)  # reported as such, not yet placed
    # Redirected or unsubscribed by Redis: placed again only after the map is read anew.
    parked: set[str] = attrs.Factory(set)
    _placed_on: Counter[NodeAddress] = attrs.Factory(Counter)
    _confirmed_on: Counter[NodeAddress] = attrs.Factory(Counter)

    def want(self, channel: str) -> None:
        if channel not in self.wanted:
            self.wanted[channel] = channel_slot(channel)
            self.unplaced.add(channel)

    def drop(self, channel: str) -> NodeAddress | None:
        """The channel is no longer wanted; returns the node to SUNSUBSCRIBE it on."""
        self.wanted.pop(channel, None)
        self.unplaced.discard(channel)
        self.missed.pop(channel, None)
        self.unavailable.discard(channel)
        self.parked.discard(channel)
        node = self.on.get(channel)
        if node is not None:
            self._unplace(channel, node)
        return node

    def unpark(self) -> None:
        self.parked.clear()

    def owners(self, slots: SlotMap) -> dict[NodeAddress, bool]:
        """The masters the wanted channels need, and whether the cluster failed each:
        those holding channels, and those serving an unplaced one's slot."""
        out = {node: False for node, n in self._placed_on.items() if n}
        for channel in self.unplaced - self.parked:
            owner = slots.owner(self.wanted[channel])
            if owner is not None:
                out[owner.address] = out.get(owner.address, False) or owner.failed
        return out

    def place(
        self, slots: SlotMap | None, linked: Callable[[NodeAddress], bool], now: float
    ) -> tuple[dict[NodeAddress, list[str]], list[str]]:
        """The unplaced wanted channels: what to subscribe on each linked node, and what
        became unavailable (no map, no owner, or an owner not linked: down or failed).
        ``linked``: whether a node's connection is up; ``now``: the wall clock."""
        send: dict[NodeAddress, list[str]] = defaultdict(list)
        newly_unavailable = []
        for channel in self.unplaced - self.parked:
            owner = slots.owner(self.wanted[channel]) if slots is not None else None
            if owner is not None and linked(owner.address):
                send[owner.address].append(channel)
                self.on[channel] = owner.address
                self._placed_on[owner.address] += 1
                self.unplaced.discard(channel)
            elif channel not in self.unavailable:
                self.unavailable.add(channel)
                self.missed.setdefault(channel, now)
                newly_unavailable.append(channel)
        return dict(send), newly_unavailable

    def lose_node(self, node: NodeAddress, since: float) -> list[str]:
        """``node``'s connection is gone: its channels are to be placed again."""
        lost = [channel for channel, on in self.on.items() if on == node]
        for channel in lost:
            self.lose(channel, since)
        return lost

    def lose(self, channel: str, since: float, *, park: bool = False) -> None:
        """``channel`` is no longer subscribed where it was (its slot moved, the node
        answered MOVED or went away): to be placed again, after the next map if
        ``park``."""
        if channel in self.confirmed:
            self.missed.setdefault(channel, since)
        self._unplace(channel, self.on[channel])
        self.unplaced.add(channel)
        if park:
            self.parked.add(channel)

    def _unplace(self, channel: str, node: NodeAddress) -> None:
        del self.on[channel]
        self._placed_on[node] -= 1
        if channel in self.confirmed:
            self.confirmed.discard(channel)
            self._confirmed_on[node] -= 1

    def misplaced(self, slots: SlotMap) -> list[str]:
        """Channels subscribed on a node that no longer owns their slot."""
        out = []
        for channel, node in self.on.items():
            owner = slots.owner(self.wanted[channel])
            if owner is None or owner.address != node:
                out.append(channel)
        return out

    def confirm(self, channel: str, node: NodeAddress) -> tuple[bool, float | None]:
        """Redis confirmed ``channel`` on ``node``: whether that holds now (it is still
        wanted there), and since when its messages may have been missed (None: none)."""
        if self.on.get(channel) != node:
            return False, None
        if channel not in self.confirmed:
            self.confirmed.add(channel)
            self._confirmed_on[node] += 1
        self.unavailable.discard(channel)
        return True, self.missed.pop(channel, None)

    def count(self, node: NodeAddress) -> int:
        """Channels Redis confirmed on ``node``."""
        return self._confirmed_on[node]

    def awaiting(self, node: NodeAddress) -> bool:
        """Channels asked for on ``node`` are not confirmed yet."""
        return self._placed_on[node] > self._confirmed_on[node]
