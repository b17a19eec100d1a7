"""The daemon: one nursery supervising the listener, the hub and the Redis subscriber."""

from __future__ import annotations

import json
import logging
import resource
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from . import logs, systemd
from .admission import FD_HEADROOM
from .cluster import NodeLocator
from .config import RESTART_FIELDS, Config, ConfigError, config_warnings, load_config
from .handshake import HandshakeRequest
from .health import RedisProbe, health_document
from .hub import Hub, InboxItem, Presence
from .inbox import Inbox
from .listen import listener_address, open_admin_listeners, open_listeners
from .messages import format_timestamp
from .metrics import Counters, Gauges, make_registry, render, stats_document
from .redis_client import SOCKET_TIMEOUT, Locator
from .sentinel import MasterLocator
from .server import Server
from .shard_subscriber import ShardWorker, run_sharded_subscriber
from .signals import UNUSED_SIGNALS, take_early_signals
from .status import StatusReporter, status_text
from .subscriber import Patterns, SubscriberState, run_redis_subscriber
from .subscriptions import Requests, UserSubscriptions

logger = logging.getLogger(__name__)

INBOX_SIZE: Final = 2  # batches in flight; see Inbox for why so few
LATE_SIGNALS_WAIT: Final = 0.05  # how long a stopping daemon still takes signals in
SUPPRESSED_EVERY: Final = 10.0  # seconds between reports of rate-limited log events
SUBSCRIBER_STALE: Final = 10.0  # seconds without a heartbeat before the thread counts as hung


@attrs.define
class App:
    """Everything one running daemon owns; built by ``App.create``, run by ``serve``."""

    config: Config
    config_file: Path | None
    environ: dict[str, str]
    counters: Counters
    hub: Hub
    subscriber: SubscriberState
    patterns: Patterns
    probe: RedisProbe
    locator: Locator | None
    server: Server
    notifier: systemd.Notifier
    # REDIS_SUBSCRIBE=user: what the instance subscribes to, as users come and go.
    user_subscriptions: UserSubscriptions | None = None
    started: float = attrs.Factory(time.monotonic)
    draining: bool = False
    socket_activated: bool = False  # listening on sockets systemd passed: WS_HOST/PORT unused
    status: StatusReporter = attrs.field(init=False)

    @classmethod
    def create(
        cls,
        config: Config,
        *,
        config_file: Path | None = None,
        environ: dict[str, str] | None = None,
        presence: Presence | None = None,
    ) -> App:
        counters = Counters()
        state = SubscriberState()
        subscriptions = None
        sharded = config.redis_pubsub == "sharded"
        if config.redis_subscribe == "user":
            subscriptions = UserSubscriptions(
                config.channels,
                config.redis_unsubscribe_grace,
                Requests(),
                # Sharded: the subscriber says which channels are unavailable (their node
                # is down); a handshake waits only for the others.
                active=(lambda: True) if sharded else (lambda: state.active),
            )
        hub = Hub(config, counters, presence or subscriptions)
        locator: Locator | None = None
        if config.redis_sentinels:
            locator = MasterLocator(config, socket_timeout=SOCKET_TIMEOUT)
        elif config.redis_cluster:
            locator = NodeLocator(config, socket_timeout=SOCKET_TIMEOUT)
        app = cls(
            config=config,
            config_file=config_file,
            environ=dict(environ or {}),
            counters=counters,
            hub=hub,
            subscriber=state,
            patterns=Patterns(config.channels.patterns),
            probe=RedisProbe(config, locator=locator),
            locator=locator,
            server=Server(config, hub, {}),
            notifier=systemd.Notifier.from_environ(environ or {}),
            user_subscriptions=subscriptions,
        )
        gauges = Gauges(
            connections=lambda: hub.connection_count,
            users=lambda: len(hub.users),
            subscriber_active=lambda: app.subscriber.active,
            circuit_state=lambda: app.probe.breaker.state,
            draining=lambda: app.draining,
        )
        registry = make_registry(counters, gauges)
        app.server.endpoints.update(
            {
                "/health": app._health,
                "/metrics": lambda request: app._metrics(registry, request),
                "/stats": lambda request: app._stats(gauges),
            }
        )
        app.status = StatusReporter(
            app.notifier,
            app._status_text,
            app.subscriber_alive,
            systemd.watchdog_interval(app.environ),
        )
        return app

    # -- endpoints ------------------------------------------------------------------

    async def _health(self, request: HandshakeRequest) -> tuple[int, str, bytes]:
        status, doc = health_document(
            redis_health=await self.probe.check(self.subscriber.subscriptions),
            subscriber=self.subscriber,
            sentinel_master=self.config.redis_sentinel_master if self.locator else "",
            cluster=self.config.redis_cluster,
            connections=self.hub.connection_count,
            users=len(self.hub.users),
            circuit_state=self.probe.breaker.state,
            draining=self.draining,
            timestamp=format_timestamp(),
            uptime=time.monotonic() - self.started,
            pattern=",".join(self.config.channels.patterns),
            mode=self.config.redis_subscribe,
        )
        return status, "application/json", _json(doc)

    async def _metrics(self, registry: Any, request: HandshakeRequest) -> tuple[int, str, bytes]:
        body, content_type = render(registry, request.headers.get("accept"))
        return 200, content_type, body

    async def _stats(self, gauges: Gauges) -> tuple[int, str, bytes]:
        doc = stats_document(
            self.counters, gauges, format_timestamp(), time.monotonic() - self.started
        )
        return 200, "application/json", _json(doc)

    # -- running --------------------------------------------------------------------

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        admin: Sequence[trio.SocketListener] = (),
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled; ``started`` once the listeners accept. ``admin`` listeners
        serve the HTTP endpoints only."""
        inbox = Inbox[InboxItem](INBOX_SIZE)
        subscriptions = self.user_subscriptions
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.hub.serve, inbox)
                if subscriptions is not None:
                    await nursery.start(subscriptions.serve)
                bound = await nursery.start(self.server.serve, listeners, admin)
                await nursery.start(self._subscriber(inbox))
                nursery.start_soon(self.status.run)
                nursery.start_soon(self._report_suppressed)
                task_status.started(bound)
        finally:
            if subscriptions is not None:
                subscriptions.requests.close()  # the subscriber thread has ended

    def _subscriber(self, inbox: Inbox[InboxItem]) -> Callable[..., Awaitable[None]]:
        """The Redis subscriber REDIS_PUBSUB and REDIS_SUBSCRIBE ask for, to be started."""
        subscriptions = self.user_subscriptions
        if self.config.redis_pubsub == "sharded":
            assert subscriptions is not None and isinstance(self.locator, NodeLocator)
            worker = ShardWorker(
                self.config,
                inbox,
                self.subscriber,
                self.counters,
                subscriptions.requests,
                self.locator,
            )
            return partial(run_sharded_subscriber, worker)
        return partial(
            run_redis_subscriber,
            self.config,
            inbox,
            self.subscriber,
            self.counters,
            self.patterns,
            requests=subscriptions.requests if subscriptions is not None else None,
            locator=self.locator,
        )

    async def shutdown(self, *, keep_backlog: bool = False) -> None:
        """Refuse new upgrades, close connections spread over the drain window.

        With an inherited (socket-activated) listener, stop accepting at once: connections
        wait in the kernel backlog for the next process. Otherwise keep answering, so
        /health reports the drain and upgrades get 503 with Retry-After.
        """
        self.draining = self.server.draining = True
        self.notifier.stopping("draining connections")
        if keep_backlog:
            self.server.stop_accepting()
        window = self.config.shutdown_timeout * 0.6
        logger.info(
            "shutting down connections=%d drain_window=%.1fs",
            self.hub.connection_count,
            window,
        )
        await self.hub.drain(window)
        self.server.stop_accepting()
        with trio.move_on_after(min(ANSWER_GRACE, self.config.shutdown_timeout * 0.2)):
            await self.server.wait_answered()

    def reload(self) -> None:
        """Re-read the configuration (SIGHUP); apply what can change live."""
        self.notifier.reloading()
        try:
            new = load_config(self.environ, self.config_file)
        except ConfigError as exc:
            for problem in exc.problems:
                logger.error("reload rejected, keeping the running configuration: %s", problem)
            self.announce_ready()
            return
        old = self.config
        changed = [
            f.name.upper()
            for f in attrs.fields(Config)
            if getattr(old, f.name) != getattr(new, f.name)
        ]
        kept = [name for name in changed if name.lower() in RESTART_FIELDS]
        unused = {"WS_HOST", "WS_PORT"} if self.socket_activated else set()
        restart = [name for name in kept if name not in unused]
        live = {f.name: getattr(new, f.name) for f in attrs.fields(Config)}
        for name in kept:
            live[name.lower()] = getattr(old, name.lower())
        applied = Config(**live)
        self.config = self.hub.config = self.server.config = applied
        # The subscriber thread sees the new patterns at its next turn and re-subscribes;
        # connections stay open.
        self.patterns.wanted = applied.channels.patterns
        if self.user_subscriptions is not None and applied.channels != old.channels:
            self.user_subscriptions.set_channels(applied.channels)
        logs.set_level(applied.logger_level)
        logger.info(
            "configuration reloaded changed=%s",
            ",".join(n for n in changed if n not in kept) or "-",
        )
        if ignored := [n for n in changed if n in unused]:
            logger.info(
                "reload: %s not used: listening on the sockets systemd passed (ListenStream=)",
                ",".join(ignored),
            )
        if restart:
            logger.warning("reload: these settings need a restart to change: %s", ",".join(restart))
        for warning in config_warnings(applied, self.config_file):
            logger.warning("%s", warning)
        self.announce_ready()

    def announce_ready(self) -> None:
        """READY=1 with the current status."""
        self.status.ready()

    def _status_text(self) -> str:
        return status_text(
            subscribed=self.subscriber.active,
            redis_state=self.subscriber.state,
            draining=self.draining,
            out_of_descriptors=self.server.out_of_descriptors,
            connections=self.hub.connection_count,
            users=len(self.hub.users),
        )

    async def _report_suppressed(self) -> None:
        """The log events that rate limits held back, for floods that stopped."""
        while True:
            await trio.sleep(SUPPRESSED_EVERY)
            logs.report_suppressed()

    def subscriber_alive(self) -> bool:
        return time.monotonic() - self.subscriber.heartbeat < SUBSCRIBER_STALE


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


async def run(
    config: Config,
    *,
    config_file: Path | None = None,
    environ: dict[str, str] | None = None,
    presence: Presence | None = None,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM or SIGINT, then drain and return."""
    environ = dict(environ or {})
    app = App.create(config, config_file=config_file, environ=environ, presence=presence)
    check_open_files(config.ws_max_connections)
    listeners, inherited = await open_listeners(config, environ)
    admin = await open_admin_listeners(config)
    app.socket_activated = inherited
    with trio.open_signal_receiver(
        signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *UNUSED_SIGNALS
    ) as signals:
        for signum in take_early_signals():  # sent while the daemon was importing
            signal.raise_signal(signum)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(app.serve, listeners, admin)
            addresses = ", ".join(listener_address(listener) for listener in bound)
            if admin:
                addresses += "; /health and /metrics alone on " + ", ".join(
                    listener_address(listener) for listener in admin
                )
            logger.info("listening on %s", addresses)
            app.announce_ready()
            task_status.started(app)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum in UNUSED_SIGNALS:
                    logger.warning("received %s, which smap-notify has no use for: ignored", name)
                    continue
                if signum == signal.SIGHUP:
                    if not app.draining:
                        app.reload()
                    continue
                if app.draining:
                    logger.warning(
                        "received %s again, stopping without waiting for the drain", name
                    )
                    nursery.cancel_scope.cancel()
                    break
                logger.info("received %s, shutting down", name)
                nursery.start_soon(_shutdown, app, nursery.cancel_scope, inherited)
        app.probe.close()
        if app.locator is not None:
            app.locator.close()
        await _take_late_signals(signals)
    logs.report_suppressed()
    logger.info("stopped")


# How long a stop waits, after the drain, for requests already accepted to be answered.
ANSWER_GRACE: Final = 1.0


def check_open_files(max_connections: int) -> None:
    """Raise the open-files limit to its hard limit (a shell's default is often 1,024);
    warn when it cannot hold ``WS_MAX_CONNECTIONS`` and what the daemon needs itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # SystemCallFilter=~@resources refuses setrlimit
            pass
    if soft != resource.RLIM_INFINITY and soft < max_connections + FD_HEADROOM:
        logger.warning(
            "open files limit %d is below WS_MAX_CONNECTIONS=%d plus %d for the daemon"
            " itself: from about %d connections new clients are answered 503;"
            " raise LimitNOFILE= (ulimit -n) or lower WS_MAX_CONNECTIONS",
            soft,
            max_connections,
            FD_HEADROOM,
            max(soft - FD_HEADROOM, 0),
        )


async def _take_late_signals(signals: AsyncIterator[int]) -> None:
    """Take the signals that arrived as the drain ended (Ctrl-C in a terminal reaches the
    demo and the daemon, and the demo then sends SIGTERM). Trio hands the signals still
    queued when its receiver closes back to the default handlers, and SIGTERM's would
    kill the process before it logs that it stopped."""
    with trio.move_on_after(LATE_SIGNALS_WAIT):
        async for signum in signals:
            logger.info("received %s while stopping", signal.Signals(signum).name)


async def _shutdown(app: App, scope: trio.CancelScope, keep_backlog: bool) -> None:
    with trio.move_on_after(app.config.shutdown_timeout * 0.8):
        await app.shutdown(keep_backlog=keep_backlog)
    scope.cancel()
