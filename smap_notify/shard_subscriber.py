"""The sharded subscriber (REDIS_PUBSUB=sharded): SSUBSCRIBE on each master, one thread.

One worker thread holds one connection per master that owns the slot of a wanted
channel, and is the only one to talk to them (redis-py's connections are not
thread-safe). Each turn it takes the plan's changes, reads the slot map when due,
subscribes what is unplaced on the slot's owner (batched per slot, pipelined), and
polls every connection at once. A channel leaves its node when the node goes away
(closed, silent, refused), when Redis unsubscribes it itself (its slot moved), when
the node answers MOVED or ASK, or when the map names another owner; it is subscribed
again wherever the map then says, retried with the reconnect backoff while its owner is
down, and its users get one ``resync`` once it is back.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import attrs
import redis
import trio

from .cluster import WATCH_INTERVAL, NodeAddress, NodeLocator, NodeNotFound
from .config import Config
from .hub import InboxItem, RawMessage, Resync, ResyncReason
from .inbox import Inbox
from .metrics import Counters
from .outage import REPORT_EVERY
from .redis_client import (
    REDIS_FAILURES,
    SOCKET_TIMEOUT,
    SubscriptionDead,
    error_reply,
    fail_fast_client,
    reconnect_delay,
)
from .resp import MAX_BATCH, Replies
from .shards import Placement, ShardNode, SlotMap, channel_slot, slot_batches
from .subscriber import (
    DEAD_AFTER,
    POLL_SECONDS,
    PROBE_AFTER,
    STALLED_AFTER,
    Coalescer,
    SubscriberState,
)
from .subscriptions import Requests, Subscription

logger = logging.getLogger(__name__)

# After ASK (the slot is being migrated) the map is read again this much later.
ASK_WAIT: Final = 0.1
# While a master owning wanted channels is down the map is read this often, to move to
# its replica as soon as the cluster promotes it (the dead master is retried with the
# reconnect backoff meanwhile).
OUTAGE_MAP_INTERVAL: Final = 0.1


async def run_sharded_subscriber(
    worker: ShardWorker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the sharded subscriber thread until cancelled; started at once."""
    with worker.inbox.send:
        task_status.started()
        await trio.to_thread.run_sync(worker.run, thread_name="redis-shards")


class _Link:
    """The subscribed connection to one master."""

    def __init__(self, address: NodeAddress, client: redis.Redis, conn: Any) -> None:
        self.address = address
        self.client = client
        self.conn = conn
        self.replies = Replies(conn)
        self.last_rx = time.monotonic()
        self.alive_at = time.time()  # wall clock of its last reply
        self.probed_at = 0.0
        self.leaving: set[str] = set()  # SUNSUBSCRIBE sent, its reply not read yet

    def close(self) -> None:
        try:
            self.client.connection_pool.release(self.conn)
            self.client.close()
        except Exception:  # closing a broken connection must not hide why it broke
            logger.debug("closing redis connection failed", exc_info=True)


@attrs.define
class _Down:
    """A master that owns wanted channels and could not be subscribed on."""

    since: float  # wall clock since when its channels may have missed messages
    attempts: int = 0
    retry_at: float = 0.0  # time.monotonic() of the next attempt
    error: str = ""


class ShardWorker:
    def __init__(
        self,
        config: Config,
        inbox: Inbox[InboxItem],
        state: SubscriberState,
        counters: Counters,
        requests: Requests,
        locator: NodeLocator,
    ) -> None:
        self.config = config
        self.inbox = inbox
        self.state = state
        self.counters = counters
        self.requests = requests
        self.locator = locator
        self.placement = Placement()
        self.links: dict[NodeAddress, _Link] = {}
        self.down: dict[NodeAddress, _Down] = {}
        self.slots: SlotMap | None = None
        self.map_due = 0.0  # time.monotonic() of the next CLUSTER NODES
        self.map_prefer: list[NodeAddress] = []  # asked first next time (a MOVED target)
        self.map_failures = 0
        self.ever_active = False
        self.changed = True  # the state to publish changed
        # Filled while reading, handed over after: confirmations for the event loop, and
        # per node the channels back after a loss with since when they were not held.
        self._confirmed: list[Subscription] = []
        self._restored: dict[NodeAddress, list[tuple[str, float]]] = defaultdict(list)
        self.coalescer = Coalescer()

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        heartbeat = time.monotonic()
        try:
            while True:
                trio.from_thread.check_cancelled()
                now = time.monotonic()
                if now - heartbeat > STALLED_AFTER + POLL_SECONDS:
                    # This thread did not run (the process was stopped): that silence is
                    # not the nodes'. Probe now; dead only if the probe goes unanswered.
                    for link in self.links.values():
                        link.last_rx = max(link.last_rx, now - PROBE_AFTER)
                heartbeat = self.state.heartbeat = now
                self._take_changes()
                if now >= self.map_due:
                    self._read_map()
                self._place()
                self._wait_and_read()
                self._probe()
                if self.changed:
                    self._publish_state()
        finally:
            for link in self.links.values():
                link.close()

    def _take_changes(self) -> None:
        leave: dict[NodeAddress, list[str]] = defaultdict(list)
        for sub, on in self.requests.take_changes().items():
            if sub.pattern:  # config refuses templates that need patterns here
                continue
            if on:
                self.placement.want(sub.name)
            elif (node := self.placement.drop(sub.name)) is not None:
                leave[node].append(sub.name)
            self.changed = True
        for node, names in leave.items():
            self._send(node, "SUNSUBSCRIBE", names)

    def _read_map(self) -> None:
        """CLUSTER NODES from a live node; channels on a node that lost their slot move."""
        now = time.monotonic()
        try:
            _, nodes = self.locator.survey(self._waiting, prefer=[*self.map_prefer, *self.links])
        except NodeNotFound as exc:
            self.map_failures += 1
            self.map_due = now + reconnect_delay(self.map_failures, 0)
            self.state.last_error = f"{type(exc).__name__}: {exc}"
            if self.map_failures % REPORT_EVERY == 1:
                logger.warning(
                    "redis cluster slot map unavailable, retrying redis=%s attempts=%d error=%s",
                    self._where(None),
                    self.map_failures,
                    self.state.last_error,
                )
            self.changed = True
            return
        self.map_failures = 0
        self.map_prefer = []
        self.slots = SlotMap.from_nodes(nodes)
        outage = self.down or self.placement.unavailable
        self.map_due = now + (OUTAGE_MAP_INTERVAL if outage else WATCH_INTERVAL)
        self.placement.unpark()
        moved = self.placement.misplaced(self.slots)
        if moved:
            by_node: dict[NodeAddress, list[str]] = defaultdict(list)
            for channel in moved:
                by_node[self.placement.on[channel]].append(channel)
            for node, names in by_node.items():
                for name in names:
                    self.placement.lose(name, time.time())
                logger.warning(
                    "redis shard slots moved, resubscribing redis=%s channels=%d",
                    self._where(node),
                    len(names),
                )
                self._send(node, "SUNSUBSCRIBE", names)
            self.changed = True

    def _place(self) -> None:
        placement, slots = self.placement, self.slots
        if slots is not None:
            owners = placement.owners(slots)
            for node in list(self.down):
                if node not in owners:  # owns nothing wanted any more (failed over, left)
                    del self.down[node]
                    self.changed = True
            for node, link in list(self.links.items()):
                if node not in owners and not link.leaving:  # holds nothing any more
                    del self.links[node]
                    link.close()
                    self.changed = True
            now = time.monotonic()
            for node, failed in owners.items():
                down = self.down.get(node)
                if failed and node not in self.links and down is None:
                    # Not tried: the replica is about to take its slots.
                    self.down[node] = _Down(time.time(), error="failed (says the cluster)")
                    self.changed = True
                elif not failed and node not in self.links:
                    if down is None or now >= down.retry_at:
                        self._connect(node)
        send, unavailable = placement.place(slots, self.links.__contains__, time.time())
        if unavailable:
            self.requests.unavailable([Subscription(name, False) for name in unavailable])
            self.changed = True
        for node, names in send.items():
            self._send(node, "SSUBSCRIBE", names)

    def _wait_and_read(self) -> None:
        links = list(self.links.values())
        ready = [link for link in links if link.replies.buffered]
        poll = select.poll()
        wake = self.requests.wake_fd
        poll.register(wake, select.POLLIN)
        by_fd = {}
        for link in links:
            by_fd[link.replies.fd] = link
            poll.register(link.replies.fd, select.POLLIN)
        timeout = 0.0 if ready or self.requests.pending else self._timeout()
        for fd, _ in poll.poll(timeout * 1000):
            if fd == wake:
                try:
                    while os.read(wake, 4096):
                        pass
                except BlockingIOError:
                    pass
            elif (link := by_fd[fd]) not in ready:
                ready.append(link)
        batch: list[RawMessage] = []
        self._read(ready, batch)
        if batch:
            # Under a steady stream, linger briefly for the next messages (as the classic
            # subscriber does): every hand-over costs both threads a wake-up.
            now = time.monotonic()
            full = any(link.replies.more for link in ready)
            linger = self.coalescer.linger(now, MAX_BATCH if full else len(batch))
            if linger:
                time.sleep(linger)
                more = {fd for fd, _ in poll.poll(0)}
                self._read([link for fd, link in by_fd.items() if fd in more], batch)
            self.state.last_message_at = datetime.now(UTC)
            self.inbox.put_from_thread(batch, self._waiting)
            self.coalescer.handed_over(time.monotonic(), len(batch))
        del batch
        if self._confirmed:
            self.requests.confirmed(self._confirmed)
            self._confirmed = []
            self.changed = True
        if self._restored:
            self._resync()

    def _read(self, links: list[_Link], batch: list[RawMessage]) -> None:
        for link in links:
            if self.links.get(link.address) is not link:
                continue  # lost meanwhile
            try:
                link.replies.read(partial(self._take, link), batch)
            except (*REDIS_FAILURES, SubscriptionDead) as exc:
                self._lose_link(link, exc)
            else:
                link.last_rx = time.monotonic()
                link.alive_at = time.time()

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [self.map_due, *(d.retry_at for d in self.down.values())]
        return max(0.0, min(POLL_SECONDS, *(t - now for t in due)))

    def _probe(self) -> None:
        now = time.monotonic()
        for link in list(self.links.values()):
            silent = now - link.last_rx
            if silent > DEAD_AFTER:
                self._lose_link(link, SubscriptionDead(f"no reply from redis for {silent:.1f}s"))
            elif silent > PROBE_AFTER and now - link.probed_at > PROBE_AFTER:
                link.probed_at = now
                self._write(link, [("PING",)])

    # -- one node -------------------------------------------------------------------

    def _connect(self, node: NodeAddress) -> None:
        client = fail_fast_client(
            node.host,
            node.port,
            password=self.config.redis_password,
            tls=self.config.redis_use_tls,
            socket_timeout=SOCKET_TIMEOUT,
        )
        try:
            conn = client.connection_pool.get_connection()
            link = _Link(node, client, conn)
        except REDIS_FAILURES as exc:
            client.close()
            self._node_failed(node, exc, self.down.get(node) or _Down(time.time()))
            return
        self.links[node] = link
        self.state.subscriptions += 1
        self.changed = True
        down = self.down.pop(node, None)
        if down is not None:
            logger.info(
                "redis shard node answers again redis=%s attempts=%d",
                self._where(node),
                down.attempts,
            )

    def _send(self, node: NodeAddress, command: str, names: Iterable[str]) -> None:
        """SSUBSCRIBE or SUNSUBSCRIBE ``names`` on ``node``: one command per slot, all
        written at once."""
        link = self.links.get(node)
        if link is None:
            return  # its channels were placed again when it was lost
        commands = [(command, *batch) for batch in slot_batches(names)]
        if command == "SUNSUBSCRIBE":
            link.leaving.update(names)
            self.counters.redis_unsubscribe_commands += len(commands)
        else:
            self.counters.redis_subscribe_commands += len(commands)
        self._write(link, commands)

    def _write(self, link: _Link, commands: list[tuple[str, ...]]) -> None:
        try:
            link.conn.send_packed_command(link.conn.pack_commands(commands), check_health=False)
        except REDIS_FAILURES as exc:
            self._lose_link(link, exc)

    def _lose_link(self, link: _Link, exc: BaseException) -> None:
        node = link.address
        if self.links.get(node) is not link:
            return
        del self.links[node]
        link.close()
        lost = self.placement.lose_node(node, link.alive_at)
        for name, since in self._restored.pop(node, ()):  # back, not yet told: lost again
            self.placement.missed[name] = min(since, self.placement.missed.get(name, since))
        self.map_due = time.monotonic()  # who owns its slots now?
        self._node_failed(node, exc, _Down(link.alive_at), lost=len(lost))

    def _node_failed(
        self, node: NodeAddress, exc: BaseException, down: _Down, lost: int | None = None
    ) -> None:
        down.error = f"{type(exc).__name__}: {exc}"
        down.retry_at = time.monotonic() + reconnect_delay(down.attempts, 0)
        down.attempts += 1
        self.down[node] = down
        self.map_due = min(self.map_due, down.retry_at)
        self.state.last_error = f"{node}: {down.error}"
        self.changed = True
        if lost is not None:
            logger.warning(
                "redis shard lost, retrying redis=%s channels=%d error=%s",
                self._where(node),
                lost,
                down.error,
            )
        elif down.attempts % REPORT_EVERY == 1:
            logger.warning(
                "redis shard unavailable, retrying redis=%s attempts=%d error=%s",
                self._where(node),
                down.attempts,
                down.error,
            )

    def _take(self, link: _Link, reply: Any, batch: list[RawMessage]) -> int:
        """Add a message to ``batch``; returns its size (0 for other replies)."""
        kind = reply[0] if isinstance(reply, list) and reply else reply
        if kind == b"smessage":
            if len(reply) != 3 or not (type(reply[1]) is bytes and type(reply[2]) is bytes):
                raise redis.InvalidResponse(
                    f"not a Redis reply (an smessage of {len(reply)} elements)"
                )
            batch.append((reply[1], reply[2]))
            return len(reply[2])
        if kind == b"ssubscribe" and len(reply) == 3:
            name = reply[1].decode("utf-8", "surrogateescape")
            held, since = self.placement.confirm(name, link.address)
            if held:
                self._confirmed.append(Subscription(name, False))
                if since is not None:
                    self._restored[link.address].append((name, since))
        elif kind == b"sunsubscribe" and len(reply) == 3:
            name = reply[1].decode("utf-8", "surrogateescape")
            if name in link.leaving:
                link.leaving.discard(name)
            elif self.placement.on.get(name) == link.address:
                # Unasked: Redis tells its shard channels' subscribers when their slot
                # leaves the node (a reshard, a failover demoting it).
                self.placement.lose(name, time.time(), park=True)
                self.map_due = time.monotonic()
                self.changed = True
                logger.info(
                    "redis shard unsubscribed by redis, slot moved redis=%s channel_slot=%d",
                    self._where(link.address),
                    channel_slot(name),
                )
        elif isinstance(reply, Exception):
            self._refused(link, reply)
        return 0

    def _refused(self, link: _Link, reply: Exception) -> None:
        """An error reply: MOVED or ASK for an SSUBSCRIBE sent before the map knew."""
        words = str(reply).split(" ")
        if words[0] in ("MOVED", "ASK") and len(words) == 3 and words[1].isdigit():
            slot = int(words[1])
            for name, node in list(self.placement.on.items()):
                if (
                    node == link.address
                    and name not in self.placement.confirmed
                    and self.placement.wanted[name] == slot
                ):
                    self.placement.lose(name, time.time(), park=True)
            now = time.monotonic()
            self.map_due = now if words[0] == "MOVED" else min(self.map_due, now + ASK_WAIT)
            host, _, port = words[2].rpartition(":")
            if port.isdigit():
                self.map_prefer = [NodeAddress(host.strip("[]"), int(port))]
            logger.info(
                "redis shard redirected redis=%s reply=%s", self._where(link.address), reply
            )
            return
        if str(reply).startswith(("NOAUTH", "WRONGPASS")):
            raise error_reply(reply)
        logger.warning(
            "redis refused a subscription command redis=%s error=%s",
            self._where(link.address),
            reply,
        )

    # -- what others see ------------------------------------------------------------

    def _resync(self) -> None:
        """One resync for the users of the channels back after a loss, per master once
        all it was asked for is confirmed."""
        channels: set[str] = set()
        since = time.time()
        for node in list(self._restored):
            if self.placement.awaiting(node):
                continue
            restored = self._restored.pop(node)
            first = min(s for _, s in restored)
            since = min(since, first)
            channels.update(name for name, _ in restored)
            self.counters.redis_reconnects += 1
            logger.warning(
                "redis shard subscription restored redis=%s channels=%d outage=%.1fs",
                self._where(node),
                len(restored),
                time.time() - first,
            )
        if not channels:
            return
        stamp = datetime.fromtimestamp(since, UTC).isoformat(timespec="microseconds")
        self.inbox.put_from_thread(
            Resync(ResyncReason.REDIS_RECONNECTED, stamp, frozenset(channels)), self._waiting
        )

    def _publish_state(self) -> None:
        self.changed = False
        state, placement = self.state, self.placement
        shards = [ShardNode(str(n), True, placement.count(n), "") for n in self.links]
        shards += [ShardNode(str(n), False, 0, d.error) for n, d in self.down.items()]
        state.shards = tuple(sorted(shards, key=lambda s: s.node))
        state.channels = len(placement.confirmed)
        state.master = None
        active = self.slots is not None and not placement.unavailable and not self.down
        if active:
            state.state = "subscribed"
            state.last_error = ""
            state.attempts = 0
            self.ever_active = True
        else:
            state.state = "retrying" if self.ever_active else "starting"
            state.attempts = max([self.map_failures, *(d.attempts for d in self.down.values())])
        state.active = active

    def _where(self, node: NodeAddress | None) -> str:
        return f"{self.locator.describe(node)} pubsub=sharded"

    def _waiting(self) -> None:
        trio.from_thread.check_cancelled()
        self.state.heartbeat = time.monotonic()
