"""The VM cache daemon and the functions that start, query and stop it.

`start_daemon(spec)` runs `python -I -m virtcontainers.factory --run-root R` in its own
session; it serves the VM cache on `<run root>/factory/cache.sock` and records its pid in
`cache.pid`. First thing, the daemon forks a watcher: when the daemon dies, however it dies,
the watcher stops the VMs still listed in the daemon's ledger and removes its socket and pid
file, so a killed server never leaks VMs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .. import host, persist
from ..errors import ConfigError
from . import ledger as ledger_mod
from . import paths
from .base import FactoryStatus
from .errors import CacheUnavailableError, FactoryError

if TYPE_CHECKING:
    from ..zygote.control import Zygote

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
EXIT_ALREADY_RUNNING = 3
EXIT_BAD_SPEC = 2
ORPHAN_CHECK = 2.0

_children: dict[int, subprocess.Popen[bytes]] = {}
"""Daemons this process started (so it can reap them)."""


@dataclass
class DaemonSpec:
    """What the daemon serves: a pool of `size` VMs from a template or from direct boots."""

    size: int
    template: str = ""
    template_root: str | None = None
    vm_config: dict[str, Any] = field(default_factory=dict)
    """`VMConfig.to_dict()` for direct boots (ignored with a template)."""
    concurrency: int = 1
    boot_timeout: float = 60.0

    def validate(self) -> None:
        if self.size < 1:
            raise ConfigError(f"factory cache size must be at least 1, got {self.size}")
        if self.concurrency < 1:
            raise ConfigError(f"factory concurrency must be at least 1, got {self.concurrency}")
        if not self.template and not self.vm_config:
            raise ConfigError("factory: give a template or a VM config to boot from")

    @classmethod
    def from_dict(cls, doc: Any) -> DaemonSpec:
        if not isinstance(doc, dict):
            raise ConfigError("factory spec: expected a JSON object")
        try:
            spec = cls(**doc)
        except TypeError as exc:
            raise ConfigError(f"factory spec: {exc}") from None
        spec.validate()
        return spec


# -- pid file -----------------------------------------------------------------------------------
def read_pid_file(run_root: str | None = None) -> tuple[int, int | None, int, int | None]:
    """(daemon pid, start time, watcher pid, start time); zeros when missing or unreadable."""
    try:
        with open(paths.pid_file(run_root), encoding="ascii") as f:
            doc = json.load(f)
        return (
            int(doc["pid"]),
            doc.get("start_time"),
            int(doc.get("watcher", 0)),
            doc.get("watcher_start_time"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return 0, None, 0, None


def running_pid(run_root: str | None = None) -> int:
    """The pid of the live daemon of this run root, or 0."""
    pid, start, _, _ = read_pid_file(run_root)
    return pid if pid and host.pid_is(pid, start) else 0


# -- client-side control ------------------------------------------------------------------------
async def start_daemon(
    spec: DaemonSpec, *, run_root: str | None = None, timeout: float = START_TIMEOUT
) -> int:
    """Start the cache server for `run_root` in the background; return its pid once it serves."""
    spec.validate()
    root = persist.run_root(run_root)
    pid = running_pid(root)
    if pid:
        raise FactoryError(f"a VM cache server is already running for {root} (pid {pid})")
    sock = paths.socket_path(root)
    persist.ensure_dir(paths.factory_dir(root))
    persist.atomic_write(paths.spec_file(root), json.dumps(asdict(spec), indent=1).encode())
    proc = _spawn(root)
    try:
        return await _wait_serving(proc, root, sock, timeout)
    except BaseException:
        # Whatever went wrong here (a timeout, a cancelled caller), leave no server behind.
        if proc.poll() is None:
            await asyncio.to_thread(_kill, proc.pid, host.process_start_time(proc.pid))
        _reap_child(proc.pid)
        await asyncio.to_thread(cleanup_after, root, proc.pid)
        raise


async def _wait_serving(proc: subprocess.Popen[bytes], root: str, sock: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            _children.pop(proc.pid, None)
            raise FactoryError(
                f"the VM cache server exited with code {code} during start-up"
                + _log_tail(paths.log_file(root))
            )
        if os.path.exists(sock) and await _answers(sock, root):
            return proc.pid
        if time.monotonic() >= deadline:
            raise FactoryError(
                f"the VM cache server did not answer within {timeout:g}s"
                + _log_tail(paths.log_file(root))
            )
        await asyncio.sleep(0.05)


def _spawn(root: str) -> subprocess.Popen[bytes]:
    """Run the daemon in its own session, its output appended to the log file."""
    with open(paths.log_file(root), "ab") as logf:
        proc = subprocess.Popen(
            host.python_command("-u", "-m", "virtcontainers.factory", "--run-root", root),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc


async def _answers(sock: str, root: str) -> bool:
    from .rpc.client import RemoteCache

    try:
        remote = await RemoteCache.connect(sock, run_root=root, timeout=1.0)
    except FactoryError:
        return False
    await remote.close()
    return True


async def daemon_status(run_root: str | None = None, timeout: float = 5.0) -> FactoryStatus:
    """The running server's status; `CacheUnavailableError` when none runs."""
    from .rpc.client import RemoteCache

    if not running_pid(run_root):
        raise CacheUnavailableError(
            f"no VM cache server runs for {persist.run_root(run_root)} "
            "(start one with `virtc factory init`)"
        )
    remote = await RemoteCache.connect(run_root=run_root, timeout=timeout)
    try:
        return await remote.status(timeout)
    finally:
        await remote.close()


async def stop_daemon(run_root: str | None = None, timeout: float = STOP_TIMEOUT) -> list[str]:
    """Stop the server (Quit, then signals) and clean up after it; returns ids of VMs that a
    dead server had left behind and that were stopped here."""
    root = persist.run_root(run_root)
    pid, start, watcher, watcher_start = read_pid_file(root)
    if pid and host.pid_is(pid, start):
        with contextlib.suppress(FactoryError):
            await _quit(root, timeout)
        if not await asyncio.to_thread(_wait_gone, pid, start, timeout):
            await asyncio.to_thread(_kill, pid, start)
    _reap_child(pid)
    for child in list(_children):  # servers of ours that died on their own, unseen till now
        _reap_child(child, block=False)
    reaped = await asyncio.to_thread(cleanup_after, root, pid)
    if watcher:
        await asyncio.to_thread(_wait_gone, watcher, watcher_start, 10.0)
    if not read_pid_file(root)[0]:
        _remove_server_files(root)
    return reaped


def _remove_server_files(root: str) -> None:
    """After a stop: the server's config, log and lock go too, then its directory if empty."""
    for path in (paths.spec_file(root), paths.log_file(root), paths.lock_file(root)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(paths.spec_file(root)))


async def _quit(root: str, timeout: float) -> None:
    from .rpc.client import RemoteCache

    remote = await RemoteCache.connect(run_root=root, timeout=2.0)
    try:
        await remote.quit(timeout)
    finally:
        await remote.close()


def cleanup_after(root: str, dead_pid: int) -> list[str]:
    """Stop VMs a dead server `dead_pid` left in its ledger; remove its socket and pid file."""
    reaped = ledger_mod.reap(paths.ledger_file(root), owner=dead_pid)
    if read_pid_file(root)[0] == dead_pid:
        for path in _own_files(root):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return reaped


def _own_files(root: str) -> tuple[str, ...]:
    """What a running server has under its directory: its socket, its zygote's, its pid."""
    return (paths.socket_path(root), paths.zygote_socket(root), paths.pid_file(root))


def _wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while host.pid_is(pid, start):
        _reap_child(pid, block=False)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _kill(pid: int, start: int | None) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not host.signal_process(pid, start, sig) or _wait_gone(pid, start, wait):
            return


def _reap_child(pid: int, block: bool = True) -> None:
    proc = _children.get(pid)
    if proc is None:
        return
    if block:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
    if proc.poll() is not None:
        _children.pop(pid, None)


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\n--- {path} ---\n{tail}" if tail else ""


# -- the daemon ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Daemon entry point: fork the watcher, then serve until Quit, SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m virtcontainers.factory")
    parser.add_argument("--run-root", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    root = persist.run_root(args.run_root)
    persist.ensure_dir(paths.factory_dir(root))
    lock_fd = os.open(paths.lock_file(root), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.error("a VM cache server already runs for %s (pid %d)", root, running_pid(root))
        return EXIT_ALREADY_RUNNING
    # A predecessor that died without its watcher (or whose watcher died too) left this.
    stale, _, _, _ = read_pid_file(root)
    cleanup_after(root, stale)
    ledger_mod.reap(paths.ledger_file(root))
    try:
        with open(paths.spec_file(root), "rb") as f:
            spec = DaemonSpec.from_dict(json.load(f))
    except (OSError, ValueError) as exc:
        log.error("cannot read the factory spec %s: %s", paths.spec_file(root), exc)
        return EXIT_BAD_SPEC
    if threading.active_count() != 1:
        log.error("internal error: threads exist before the watcher fork")
        return 1
    read_end, write_end = os.pipe()
    watcher = os.fork()
    if watcher == 0:
        os.close(write_end)
        os.close(lock_fd)
        _watch(read_end, root, os.getppid(), host.process_start_time(os.getppid()))
        os._exit(0)
    os.close(read_end)
    _write_pid_file(root, watcher)
    zygote = _start_zygote(root)
    try:
        return asyncio.run(_serve(root, spec))
    finally:
        if zygote is not None:
            zygote.stop()
        _remove_own_files(root)
        # write_end stays open until this process exits: the watcher's cue.


def _start_zygote(root: str) -> Zygote | None:
    """The zygote beside this server (`virtc` and shim commands forked pre-imported), unless
    $VIRTC_NO_ZYGOTE is set; a zygote that cannot start costs speed only, not the cache."""
    from ..zygote import control

    if not control.enabled():
        return None
    try:
        return control.start(paths.zygote_socket(root), paths.log_file(root))
    except (OSError, ConfigError) as exc:
        log.warning("VM cache: no zygote: %s", exc)
        return None


def _write_pid_file(root: str, watcher: int) -> None:
    doc = {
        "pid": os.getpid(),
        "start_time": host.process_start_time(os.getpid()),
        "watcher": watcher,
        "watcher_start_time": host.process_start_time(watcher),
    }
    persist.atomic_write(paths.pid_file(root), json.dumps(doc).encode())


def _remove_own_files(root: str) -> None:
    if read_pid_file(root)[0] == os.getpid():
        for path in _own_files(root):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _watch(read_end: int, root: str, daemon_pid: int, daemon_start: int | None) -> None:
    """Watcher process: wait for the daemon to die (pipe EOF), then clean up after it."""
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            if not os.read(read_end, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os.close(read_end)
    # EOF comes while the daemon is still exiting; its ledger is reaped only once it is dead.
    _wait_gone(daemon_pid, daemon_start, 10.0)
    try:
        cleanup_after(root, daemon_pid)
    except Exception as exc:  # the watcher must exit whatever happens
        log.error("VM cache watcher: cleanup failed: %s", exc)


async def _quit_when_orphaned(root: str, socket_path: str, server: Any) -> None:
    """Quit once no client can find this server (its socket or pid file was removed)."""
    while True:
        await asyncio.sleep(ORPHAN_CHECK)
        if not os.path.exists(socket_path) or read_pid_file(root)[0] != os.getpid():
            log.warning("VM cache: socket or pid file under %s is gone; quitting", root)
            server.request_quit()
            return


async def _serve(root: str, spec: DaemonSpec) -> int:
    from ..errors import VCError
    from . import poolshare
    from .base import DirectBase, FactoryBase, TemplateBase
    from .cache import REFILL_DELAY, VMCache
    from .ledger import Ledger
    from .rpc.server import CacheServer
    from .template import TemplateStore
    from .vmconfig import VMConfig

    base: FactoryBase
    try:
        if spec.template:
            store = TemplateStore(spec.template_root, run_root=root)
            base = TemplateBase(store, spec.template)
        else:
            base = DirectBase(VMConfig.from_dict(spec.vm_config), run_root=root)
    except VCError as exc:
        log.error("cannot start the VM cache: %s", exc)
        return EXIT_BAD_SPEC
    ledger = Ledger(paths.ledger_file(root), root)
    cache = VMCache(
        base,
        spec.size,
        concurrency=spec.concurrency,
        boot_timeout=spec.boot_timeout,
        ledger=ledger,
        stage_root=root if poolshare.wanted(base.config()) else None,
        refill_delay=REFILL_DELAY,
    )
    server = CacheServer(cache, paths.socket_path(root))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_quit)
    watch: asyncio.Task[None] | None = None
    try:
        await server.start()
        await cache.start()
        log.info("VM cache serving %d VM(s) of %s on %s", spec.size, base.name, server.socket_path)
        watch = asyncio.create_task(_quit_when_orphaned(root, server.socket_path, server))
        await server.wait_quit()
        log.info("VM cache: quitting")
    finally:
        if watch is not None:
            watch.cancel()
        await server.stop()
        await cache.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.ledger_file(root))
    return 0
