"""Command line: ``smap-notify [--config FILE] [--check-config [--quiet]]``."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Final, NoReturn

import trio
from jwt.warnings import InsecureKeyLengthWarning

from . import app, collector, listen, logs, systemd
from .config import ConfigError, config_warnings, load_config

logger = logging.getLogger("smap_notify")

EX_OK: Final = 0
EX_SOFTWARE: Final = 70  # the daemon failed while running
EX_CONFIG: Final = 78  # sysexits EX_CONFIG: systemd shows it as "configuration error"
EX_USAGE: Final = 64  # sysexits EX_USAGE: a wrong command line; not restarted either


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own status, 2, is one that systemd's Restart=on-failure restarts:
        # a typo in ExecStart= would be retried until the start limit.
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _version() -> str:
    try:
        return importlib.metadata.version("smap-notify")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "(not installed)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(
        prog="smap-notify",
        description="Deliver SMAP notifications from Redis Pub/Sub (user_noti:*) to WebSockets.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="KEY=VALUE file (EnvironmentFile format); its values win over the environment "
        "and it is re-read on SIGHUP",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="print the effective configuration (secrets masked) and exit: 0 valid, 78 invalid",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="with --check-config: print only the problems of an invalid configuration "
        "(for ExecReload=, before the daemon is signalled)",
    )
    args = parser.parse_args(argv)
    if args.quiet and not args.check_config:
        parser.error("--quiet goes with --check-config")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    environ = dict(os.environ)
    try:
        config = load_config(environ, args.config)
    except ConfigError as exc:
        if logs.is_journal_stream(sys.stderr, environ):
            # One entry per problem, with its priority: journalctl -p err shows them.
            logs.configure_logging("info", environ=environ)
            for problem in exc.problems:
                logger.critical("invalid configuration: %s", problem)
            return EX_CONFIG
        print("smap-notify: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config and args.quiet:
        return EX_OK
    if args.check_config:
        for key, value in config.masked().items():
            print(f"{key}={value}")
        warnings_ = config_warnings(config, args.config)
        if unusable := listen.listen_host_problem(config.ws_host):
            # Not an error here: under socket activation WS_HOST is not used.
            warnings_.append(
                f"WS_HOST={config.ws_host}: {unusable}; started without smap-notify.socket,"
                " the daemon would exit with 78"
            )
        # Run as ExecStartPre=, stderr is the journal: the warnings keep their priority.
        prefix = "<4>" if logs.is_journal_stream(sys.stderr, environ) else ""
        for warning in warnings_:
            print(f"{prefix}smap-notify: warning: {warning}", file=sys.stderr)
        return EX_OK
    logs.configure_logging(config.logger_level)
    # Python warnings (libraries') in the log's own format and priority, not as raw lines.
    logging.captureWarnings(True)
    # A short secret is reported once by config_warnings below; PyJWT would add a warning
    # on the first token of every key and algorithm.
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
    logger.info(
        "starting smap-notify version=%s env=%s redis=%s listen=%s",
        _version(),
        config.env or "production",
        f"sentinel sentinel_master={config.redis_sentinel_master}"
        f" sentinels={','.join(config.redis_sentinels)}"
        if config.redis_sentinels
        else f"cluster nodes={config.redis_host} pubsub={config.redis_pubsub}"
        if config.redis_cluster
        else config.redis_host,
        # Socket activation's sockets, if any, win over WS_HOST and WS_PORT.
        "socket-activation"
        if systemd.activated(environ, pid=os.getpid())
        else listen.host_port(config.ws_host, config.ws_port),
    )
    for warning in config_warnings(config, args.config):
        logger.warning("%s", warning)
    collector.freeze_start_up()
    # The event loop and the Redis thread hand the GIL to each other all the time; the
    # default 5 ms switch interval would let one wait that long for the other.
    sys.setswitchinterval(0.0005)
    try:
        trio.run(
            lambda: app.run(config, config_file=args.config, environ=environ),
        )
    except KeyboardInterrupt:
        return EX_OK
    except listen.ListenError as exc:
        # systemd restarts on 70 (an address in use may come free), not on 78.
        logger.critical("%s", exc)
        return EX_CONFIG if exc.lasting else EX_SOFTWARE
    except BaseException as exc:  # the one place that turns a crash into an exit status
        logger.critical("smap-notify failed: %s", _describe(exc), exc_info=exc)
        return EX_SOFTWARE
    return EX_OK


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
