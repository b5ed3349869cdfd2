"""The shim server: serves containerd.task.v2.Task on the socket `start` bound (fd 3), logs to
the bundle's `log` FIFO (containerd copies it into its own log), exits after Shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import time

from .cleanup import delete_response
from .config import ShimConfig
from .events import Publisher
from .main import CLEAN_EXIT, Flags, write_file
from .service import TaskService
from .ttrpc import Server
from .vm import PodVM, SandboxVM

log = logging.getLogger("virtcontainers.shim")


class _LogfmtFormatter(logging.Formatter):
    """logrus's text format, as containerd's own log lines look."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.created % 1 * 1e9):09d}"
        msg = record.getMessage().replace("\\", "\\\\").replace('"', '\\"')
        if record.exc_info:
            msg += " " + self.formatException(record.exc_info).replace("\n", " | ")
        level = record.levelname.lower().replace("warning", "warn")
        return f'time="{ts}Z" level={level} msg="{msg}" runtime=io.containerd.virtc.v2'


def _log_to_fifo(debug: bool) -> None:
    """Log into the bundle's `log` FIFO when containerd holds its read end; else nowhere."""
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        stream = os.fdopen(fd, "w", buffering=1)
    except OSError as e:
        if e.errno not in (errno.ENXIO, errno.ENOENT):
            raise
        stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_LogfmtFormatter())
    handler.addFilter(_quiet_pyroute2)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _quiet_pyroute2(record: logging.LogRecord) -> bool:
    """containerd -debug asks for the shim's story, not every netlink message pyroute2 parses:
    its records below WARNING are dropped here (a level set on its logger is undone when
    pyroute2 is imported, at a pod's network)."""
    return record.levelno >= logging.WARNING or not (
        record.name == "pyroute2" or record.name.startswith("pyroute2.")
    )


def serve(flags: Flags, listen_fd: int) -> int:
    _log_to_fifo(flags.debug)
    log.debug("shim %s: server process up", flags.id)
    code = 0
    try:
        asyncio.run(_serve(flags, listen_fd))
    except Exception:
        log.exception("shim %s failed", flags.id)
        code = 1
    log.debug("shim %s: exiting (%d)", flags.id, code)
    logging.shutdown()
    # Not a normal exit: a worker thread may still be blocked opening a FIFO nobody opens.
    os._exit(code)


def _collect_cycles() -> None:
    """Turn the cycle collector back on (`main` turned it off while modules load), the
    objects made so far (the modules' own) kept out of its passes."""
    gc.freeze()
    gc.enable()


async def _serve(flags: Flags, listen_fd: int) -> None:
    listener = socket.socket(fileno=listen_fd)
    path = listener.getsockname()
    config = ShimConfig.load()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    publisher = Publisher(
        flags.namespace,
        ttrpc_address=os.environ.get("TTRPC_ADDRESS", ""),
        publish_binary=flags.publish_binary,
        containerd_address=flags.address,
    )

    def new_vm(sandbox_id: str, bundle: str, config_path: str) -> PodVM:
        cfg = ShimConfig.load(config_path) if config_path else config
        return SandboxVM(
            sandbox_id, bundle, cfg.hypervisor, factory=cfg.factory, config=cfg.hypervisor_config
        )

    tasks = TaskService(
        new_vm, publisher, flags.namespace, flags.id, shutdown=stop.set, created=_collect_cycles
    )
    server = Server([tasks.service()])
    await server.serve_socket(listener)
    log.info("shim %s serving on %s (pid %d)", flags.id, path, os.getpid())
    try:
        await stop.wait()
    finally:
        log.info("shim %s shutting down", flags.id)
        # The Shutdown call's answer is written already: its handler sets `stop` and the
        # reply goes out in the same step of the loop, before this task runs again.
        await server.close()
        clean = False
        try:
            await tasks.close()
            clean = True
        except Exception:
            log.exception("shim %s: stopping its containers and VM", flags.id)
        log.debug("shim %s: VM stopped", flags.id)
        await publisher.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if clean:  # in the bundle `start` ran in: `delete` finds nothing to do
            write_file(CLEAN_EXIT, delete_response())
