"""containerd.task.v2.Task: the containers and processes of one pod, run in its VM.

Process states, errors and events follow containerd 1.6's runc shim (what `ctr` and the CRI
plugin expect): errors carry errdefs' codes (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
UNIMPLEMENTED, INVALID_ARGUMENT); events go out in the order the shim guide requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from ..agent.client import AgentRequestError
from ..containers.spec import resources_from_oci
from ..errors import VCError
from .events import Publisher, now, pack
from .proto.cgroups.v2.stats import metrics_pb2
from .proto.containerd.api.events import task_pb2 as ev
from .proto.containerd.api.types import mount_pb2
from .proto.containerd.api.types.task import task_pb2 as tasktypes
from .proto.containerd.pkg.runtimeoptions.v1 import api_pb2 as runtimeoptions
from .proto.containerd.runtime.v2.task import shim_pb2 as pb
from .stdio import ProcessIO, Stdio, StdioError
from .ttrpc import CallContext, Code, Service, TtrpcError
from .vm import SIGKILL, GuestProcess, PodVM, ProcessSpec, VMError, signal_exit_status

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
CREATED, RUNNING, STOPPED, PAUSED = (
    tasktypes.CREATED,
    tasktypes.RUNNING,
    tasktypes.STOPPED,
    tasktypes.PAUSED,
)
#: Options in CreateTaskRequest.options the shim understands (CRI sends runtimeoptions).
OPTIONS_TYPES = {runtimeoptions.Options.DESCRIPTOR.full_name}
#: Root filesystem mount types the shim can hand to the VM.
SHAREABLE_MOUNTS = {"overlay", "bind", "rbind"}
PROCESS_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
#: A terminal's size until the first ResizePty (what a terminal starts with).
ROWS, COLS = 24, 80
RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def _err(code: Code, message: str) -> TtrpcError:
    return TtrpcError(code, message)


@dataclass
class Process:
    container_id: str
    exec_id: str
    spec: ProcessSpec
    stdio: Stdio
    pid: int = 0
    status: tasktypes.Status = CREATED
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp = field(default_factory=timestamp_pb2.Timestamp)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    io: ProcessIO | None = None
    runner: asyncio.Task[None] | None = None
    guest: GuestProcess | None = None
    killed_by: int = 0
    size: tuple[int, int] = (ROWS, COLS)
    """rows, cols of its terminal (a ResizePty before the start applies at the start)."""


@dataclass
class Container:
    id: str
    bundle: str
    rootfs: str
    mounted: bool
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    oom_watch: asyncio.Task[None] | None = None


class TaskService:
    """The task API over a PodVM, made by `vm_factory(shim id, bundle, config path)` at the
    first Create (the config path from CRI's runtime options, "" for the shim's default).
    `shutdown` is called by a Shutdown once no container is left, `created` after the first
    Create that succeeds."""

    def __init__(
        self,
        vm_factory: Callable[[str, str, str], PodVM],
        publisher: Publisher,
        namespace: str,
        shim_id: str,
        *,
        shutdown: Callable[[], None] = lambda: None,
        created: Callable[[], None] = lambda: None,
    ) -> None:
        self.vm_factory = vm_factory
        self.vm: PodVM | None = None
        self.events = publisher
        self.namespace = namespace
        self.shim_id = shim_id
        self.containers: dict[str, Container] = {}
        self.paused = False
        self._shutdown = shutdown
        self._created: Callable[[], None] | None = created
        self._lock = asyncio.Lock()
        self._ending: asyncio.Task[None] | None = None
        """The end of the VM after its last container's Delete (`_end_vm`): `close` waits."""
        self._signalling: set[asyncio.Task[None]] = set()
        """Signals still unanswered by the guest whose process has exited (`_signal`)."""

    # -- the ttrpc service -----------------------------------------------------------------
    def service(self) -> Service:
        svc = Service(SERVICE)
        for name, req in (
            ("State", pb.StateRequest),
            ("Create", pb.CreateTaskRequest),
            ("Start", pb.StartRequest),
            ("Delete", pb.DeleteRequest),
            ("Pids", pb.PidsRequest),
            ("Pause", pb.PauseRequest),
            ("Resume", pb.ResumeRequest),
            ("Checkpoint", pb.CheckpointTaskRequest),
            ("Kill", pb.KillRequest),
            ("Exec", pb.ExecProcessRequest),
            ("ResizePty", pb.ResizePtyRequest),
            ("CloseIO", pb.CloseIORequest),
            ("Update", pb.UpdateTaskRequest),
            ("Wait", pb.WaitRequest),
            ("Stats", pb.StatsRequest),
            ("Connect", pb.ConnectRequest),
            ("Shutdown", pb.ShutdownRequest),
        ):
            svc.unary(name, req, self._handler(getattr(self, name.lower())))
        return svc

    @staticmethod
    def _handler(fn: Callable[[Any], Any]) -> Callable[[CallContext, Any], Any]:
        async def call(ctx: CallContext, request: Message) -> Message:
            try:
                result: Message = await fn(request)
            except (VMError, StdioError, VCError) as e:
                raise TtrpcError(Code.FAILED_PRECONDITION, str(e)) from e
            return result

        return call

    # -- lookups ---------------------------------------------------------------------------
    def _container(self, cid: str) -> Container:
        try:
            return self.containers[cid]
        except KeyError:
            raise _err(Code.NOT_FOUND, f"container {cid}: not found") from None

    def _process(self, cid: str, exec_id: str) -> Process:
        c = self._container(cid)
        if not exec_id:
            return c.init
        try:
            return c.execs[exec_id]
        except KeyError:
            raise _err(Code.NOT_FOUND, f"process {exec_id} of container {cid}: not found") from None

    def _pid(self) -> int:
        return self.vm.pid if self.vm is not None else 0

    # -- create / start ----------------------------------------------------------------------
    async def create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        if req.checkpoint or req.parent_checkpoint:
            raise _err(Code.UNIMPLEMENTED, "restoring from a checkpoint: not implemented")
        if req.options.type_url and req.options.type_url not in OPTIONS_TYPES:
            raise _err(
                Code.INVALID_ARGUMENT,
                f"unknown runtime options type {req.options.type_url!r} "
                f"(understood: {', '.join(sorted(OPTIONS_TYPES))})",
            )
        config_path = ""
        if req.options.type_url == runtimeoptions.Options.DESCRIPTOR.full_name:
            try:
                config_path = runtimeoptions.Options.FromString(req.options.value).config_path
            except DecodeError as e:
                raise _err(Code.INVALID_ARGUMENT, f"runtime options: {e}") from e
        log.debug("create %s: received", req.id)
        async with self._lock:
            if req.id in self.containers:
                raise _err(Code.ALREADY_EXISTS, f"container {req.id}: already exists")
            spec = _read_spec(req.bundle)
            process = ProcessSpec.from_oci(_oci_process(spec, req.bundle))
            for m in req.rootfs:
                if m.type not in SHAREABLE_MOUNTS:
                    raise _err(
                        Code.INVALID_ARGUMENT,
                        f"rootfs mount type {m.type!r} of {req.id} cannot be shared with the VM "
                        f"(supported: {', '.join(sorted(SHAREABLE_MOUNTS))})",
                    )
            rootfs = os.path.join(req.bundle, "rootfs")
            mounted = await _mount_rootfs(list(req.rootfs), rootfs)
            log.debug("create %s: rootfs mounted", req.id)
            stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
            container = Container(
                req.id, req.bundle, rootfs, mounted, Process(req.id, "", process, stdio)
            )
            try:
                if self.vm is None:
                    vm = self.vm_factory(self.shim_id, req.bundle, config_path)
                    try:
                        await vm.start()
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await vm.stop()
                        raise
                    self.vm = vm
                    log.debug("create %s: VM ready", req.id)
                await self.vm.add_container(req.id, req.bundle)
                log.debug("create %s: container made in the guest", req.id)
                container.init.io = await ProcessIO.open(stdio, req.id, self.namespace)
            except BaseException:
                if container.init.io is not None:
                    await container.init.io.close()
                if mounted:
                    await _umount(rootfs)
                raise
            container.init.pid = self.vm.task_pid(req.id)
            self.containers[req.id] = container
        if self._created is not None:
            created, self._created = self._created, None
            created()
        self.events.publish(
            ev.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=list(req.rootfs),
                io=ev.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                checkpoint=req.checkpoint,
                pid=container.init.pid,
            )
        )
        return pb.CreateTaskResponse(pid=container.init.pid)

    async def start(self, req: pb.StartRequest) -> pb.StartResponse:
        log.debug("start %s/%s: received", req.id, req.exec_id)
        p = self._process(req.id, req.exec_id)
        if p.status != CREATED:
            raise _err(
                Code.FAILED_PRECONDITION,
                f"process {req.exec_id or req.id} cannot be started: it is "
                f"{tasktypes.Status.Name(p.status).lower()}",
            )
        if self.paused:
            raise _err(Code.FAILED_PRECONDITION, f"container {req.id} is paused")
        p.status = RUNNING
        p.pid = self._pid()
        started = asyncio.Event()
        p.runner = asyncio.get_running_loop().create_task(self._run(p, started))
        # Answer once the process runs (an exec or a signal may follow at once), or has ended.
        waiting = asyncio.ensure_future(started.wait())
        await asyncio.wait({waiting, p.runner}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        log.debug("start %s/%s: running", req.id, req.exec_id)
        if not req.exec_id:
            c = self._container(req.id)
            c.oom_watch = asyncio.get_running_loop().create_task(self._watch_oom(req.id))
        return pb.StartResponse(pid=p.pid)

    async def _run(self, p: Process, started: asyncio.Event) -> None:
        """Run a process: its output copied to containerd as written, stdin as it comes. The
        exit is reported (Wait, the exit event) once all output is copied and the output
        FIFOs are closed (the client reads them to their end before it deletes the process),
        not waiting for stdin: a client may keep it open after the process has ended."""
        assert self.vm is not None and p.io is not None
        io = p.io
        status = 0
        copying: list[asyncio.Task[None]] = []
        announced = False
        try:
            spec = dataclasses.replace(p.spec, terminal=p.stdio.terminal)
            rows, cols = p.size
            proc = await self.vm.start_process(p.container_id, p.exec_id, spec, rows, cols)
            p.guest = proc
            if not p.exec_id:  # the container's task pid is known once its process runs
                p.pid = self.vm.task_pid(p.container_id)
            self._started(p)
            announced = True
            started.set()
            if p.size != (rows, cols):  # resized while it was starting
                await proc.resize(*p.size)
            loop = asyncio.get_running_loop()
            copying.append(loop.create_task(io.copy_stdin(proc.write_stdin, proc.close_stdin)))
            await asyncio.gather(io.copy_output(proc.stdout), io.copy_output(proc.stderr, True))
            result = await proc.wait()
            log.debug("process %s/%s: exited", p.container_id, p.exec_id)
            status = signal_exit_status(result.signal) if result.signal else result.exit_code
        except asyncio.CancelledError:
            status = signal_exit_status(p.killed_by or SIGKILL)
            if p.guest is not None:
                with contextlib.suppress(Exception):
                    await p.guest.signal(SIGKILL)
        except Exception as e:
            log.error("process %s/%s failed: %s", p.container_id, p.exec_id, e)
            with contextlib.suppress(Exception):
                await io.write_stderr(f"virtc: {e}\n".encode())
            status = 255
        finally:
            for task in copying:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await io.close()
            if not announced:
                self._started(p)
            self._exited(p, status)

    def _started(self, p: Process) -> None:
        """The start event of a process (before its exit, even when it failed to start)."""
        if p.exec_id:
            started = ev.TaskExecStarted(container_id=p.container_id, exec_id=p.exec_id, pid=p.pid)
            self.events.publish(started)
        else:
            self.events.publish(ev.TaskStart(container_id=p.container_id, pid=p.pid))

    async def _watch_oom(self, container_id: str) -> None:
        """A TaskOOM event each time the guest kills a process of the container for want of
        memory (its cgroup's memory.events oom_kill grows)."""
        assert self.vm is not None
        try:
            async for _ in self.vm.oom_kills(container_id):
                self.events.publish(ev.TaskOOM(container_id=container_id))
        except (VMError, VCError) as e:
            log.warning("OOM events of %s: %s", container_id, e)

    def _exited(self, p: Process, status: int) -> None:
        p.status = STOPPED
        p.exit_status = status
        p.exited_at = now()
        p.exited.set()
        self.events.publish(
            ev.TaskExit(
                container_id=p.container_id,
                id=p.exec_id or p.container_id,
                pid=p.pid,
                exit_status=status,
                exited_at=p.exited_at,
            )
        )

    # -- exec --------------------------------------------------------------------------------
    async def exec(self, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        if req.exec_id in c.execs:
            raise _err(Code.ALREADY_EXISTS, f"exec {req.exec_id} of {req.id}: already exists")
        if not req.exec_id:
            raise _err(Code.INVALID_ARGUMENT, "exec id must not be empty")
        if c.init.status == STOPPED:
            raise _err(Code.FAILED_PRECONDITION, f"container {req.id} is stopped")
        if req.spec.type_url != PROCESS_TYPE:
            raise _err(
                Code.INVALID_ARGUMENT,
                f"exec spec of type {req.spec.type_url!r}: expected {PROCESS_TYPE}",
            )
        try:
            process = ProcessSpec.from_oci(json.loads(req.spec.value))
        except (ValueError, VMError) as e:
            raise _err(Code.INVALID_ARGUMENT, f"exec {req.exec_id}: bad process spec: {e}") from e
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        p = Process(req.id, req.exec_id, process, stdio)
        c.execs[req.exec_id] = p
        try:
            p.io = await ProcessIO.open(stdio, req.id, self.namespace)
        except BaseException:
            del c.execs[req.exec_id]
            raise
        self.events.publish(ev.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    # -- signals, waiting, state ---------------------------------------------------------------
    async def kill(self, req: pb.KillRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        targets = [self._process(req.id, req.exec_id)]
        if req.all:
            targets = [c.init, *c.execs.values()]
        for p in targets:
            if p.status == STOPPED:
                if not req.all:
                    raise _err(
                        Code.NOT_FOUND, f"process {p.exec_id or p.container_id}: already finished"
                    )
                continue
            p.killed_by = req.signal
            if p.runner is not None:
                await self._signal(p, req.signal)
            elif p.status == CREATED:
                # Never started: it ends without running (runc reports it stopped).
                if p.io is not None:
                    await p.io.close()
                self._exited(p, signal_exit_status(req.signal))
        if not req.exec_id and not req.all:
            # Ending the init process ends every exec of the container, as in a PID namespace.
            for p in c.execs.values():
                if p.runner is not None and p.status != STOPPED:
                    p.killed_by = 9
                    p.runner.cancel()
        return empty_pb2.Empty()

    async def _signal(self, p: Process, sig: int) -> None:
        """Signal a started process: the container's first one as the container's (its pid 1),
        an exec through its handle; one still starting is ended. Done once the guest has
        answered or the process has exited, whichever comes first: the guest's answer to a
        kill (a process of its own) may come after the exit the kill caused, and containerd,
        told of that exit, may meanwhile delete the task and shut the shim down, VM and
        connections, so that answer would never come or come as an error."""
        assert p.runner is not None
        guest, vm = p.guest, self.vm
        if guest is None or vm is None:
            p.runner.cancel()
            return
        loop = asyncio.get_running_loop()
        sending = loop.create_task(guest.signal(sig) if p.exec_id else vm.kill(p.container_id, sig))
        ended = loop.create_task(p.exited.wait())
        try:
            await asyncio.wait({sending, ended}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            sending.cancel()
            raise
        finally:
            ended.cancel()
        if not sending.done():
            log.debug("kill %s/%s: exited before the guest answered", p.container_id, p.exec_id)
            self._signalling.add(sending)  # its answer is no longer wanted
            sending.add_done_callback(self._signal_answered)
            return
        try:
            sending.result()
        except AgentRequestError as e:
            # Gone in the guest, its exit not seen here yet (with --all: ended by its
            # container's pid 1 just killed); the exit arrives through its wait.
            if e.errno != errno.ESRCH and not p.exited.is_set():
                raise
        except (VMError, VCError):
            if not p.exited.is_set():
                raise

    def _signal_answered(self, sending: asyncio.Task[None]) -> None:
        """The guest's late answer to a signal whose process had exited: nothing to report."""
        self._signalling.discard(sending)
        if not sending.cancelled() and sending.exception() is not None:
            log.debug("a signal answered after its process's exit: %s", sending.exception())

    async def wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        p = self._process(req.id, req.exec_id)
        await p.exited.wait()
        return pb.WaitResponse(exit_status=p.exit_status, exited_at=p.exited_at)

    async def state(self, req: pb.StateRequest) -> pb.StateResponse:
        c = self._container(req.id)
        p = self._process(req.id, req.exec_id)
        status = PAUSED if self.paused and p.status == RUNNING else p.status
        return pb.StateResponse(
            id=req.exec_id or req.id,
            bundle=c.bundle,
            pid=p.pid,
            status=status,
            stdin=p.stdio.stdin,
            stdout=p.stdio.stdout,
            stderr=p.stdio.stderr,
            terminal=p.stdio.terminal,
            exit_status=p.exit_status,
            exited_at=p.exited_at,
            exec_id=req.exec_id,
        )

    async def pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        c = self._container(req.id)
        if self.vm is None or c.init.status not in (RUNNING, PAUSED):
            return pb.PidsResponse()
        # The guest's pids of the container (the VM's processes, not the host's).
        return pb.PidsResponse(
            processes=[tasktypes.ProcessInfo(pid=pid) for pid in await self.vm.pids(req.id)]
        )

    # -- delete ------------------------------------------------------------------------------
    async def delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        log.debug("delete %s/%s: received", req.id, req.exec_id)
        c = self._container(req.id)
        p = self._process(req.id, req.exec_id)
        if p.status not in (CREATED, STOPPED):
            raise _err(
                Code.FAILED_PRECONDITION,
                f"cannot delete running process {req.exec_id or req.id}: kill it first",
            )
        if p.status == CREATED:
            if p.io is not None:
                await p.io.close()
            p.status, p.exited_at = STOPPED, now()
        if req.exec_id:
            del c.execs[req.exec_id]
        else:
            for e in list(c.execs.values()):
                if e.runner is not None:
                    e.runner.cancel()
                    with contextlib.suppress(BaseException):
                        await e.runner
            del self.containers[req.id]
            if self.vm is not None and req.id == self.shim_id and not self.containers:
                # The VM was made for this container (or pod) alone and nothing is left in
                # it: killed at once (its host side all cleaned up), not shut down in turn,
                # while Delete is answered (the container's state is final): Shutdown, then
                # the shim's exit, wait for it. The OOM watch's guest process ends with the
                # VM: its end is not waited for first.
                if c.oom_watch is not None:
                    c.oom_watch.cancel()
                vm, self.vm = self.vm, None
                self._ending = asyncio.get_running_loop().create_task(self._end_vm(vm, c))
            else:
                await _cancel(c.oom_watch)
                if self.vm is not None:
                    await self.vm.remove_container(req.id)
                    log.debug("delete %s: container removed from the guest", req.id)
                if c.mounted:
                    await _umount(c.rootfs)
        self.events.publish(
            ev.TaskDelete(
                container_id=req.id,
                pid=p.pid,
                exit_status=p.exit_status,
                exited_at=p.exited_at,
                id=req.exec_id,
            )
        )
        log.debug("delete %s/%s: answered", req.id, req.exec_id)
        return pb.DeleteResponse(pid=p.pid, exit_status=p.exit_status, exited_at=p.exited_at)

    async def _end_vm(self, vm: PodVM, c: Container) -> None:
        """Kill the VM of the shim's last container, then unmount that container's root; a
        VM that could not be stopped is kept for `close` to stop. Then the container's OOM
        watch (cancelled: its guest process ended with the VM) is waited for."""
        try:
            await vm.stop(force=True)
            log.debug("delete %s: VM killed", c.id)
        except Exception as e:
            log.error("killing the VM of %s: %s", c.id, e)
            self.vm = vm
        finally:
            if c.mounted:
                await _umount(c.rootfs)
            await _cancel(c.oom_watch)

    # -- the VM ------------------------------------------------------------------------------
    async def pause(self, req: pb.PauseRequest) -> empty_pb2.Empty:
        self._container(req.id)
        if self.vm is None or self.paused:
            raise _err(Code.FAILED_PRECONDITION, f"container {req.id} is not running")
        await self.vm.pause()
        self.paused = True
        self.events.publish(ev.TaskPaused(container_id=req.id))
        return empty_pb2.Empty()

    async def resume(self, req: pb.ResumeRequest) -> empty_pb2.Empty:
        self._container(req.id)
        if self.vm is None or not self.paused:
            raise _err(Code.FAILED_PRECONDITION, f"container {req.id} is not paused")
        await self.vm.resume()
        self.paused = False
        self.events.publish(ev.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    async def checkpoint(self, req: pb.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise _err(Code.UNIMPLEMENTED, "checkpoint: not implemented")

    async def resizepty(self, req: pb.ResizePtyRequest) -> empty_pb2.Empty:
        p = self._process(req.id, req.exec_id)
        if not p.stdio.terminal:
            raise _err(Code.FAILED_PRECONDITION, f"process {req.exec_id or req.id} has no terminal")
        if not 1 <= req.height <= 0xFFFF or not 1 <= req.width <= 0xFFFF:
            raise _err(
                Code.INVALID_ARGUMENT,
                f"terminal size {req.width}x{req.height}: width and height must be 1..65535",
            )
        p.size = (req.height, req.width)
        if p.guest is not None and p.status == RUNNING:
            await p.guest.resize(req.height, req.width)
        return empty_pb2.Empty()

    async def closeio(self, req: pb.CloseIORequest) -> empty_pb2.Empty:
        p = self._process(req.id, req.exec_id)
        if req.stdin and p.io is not None:
            p.io.close_stdin()
        return empty_pb2.Empty()

    async def update(self, req: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        self._container(req.id)
        if self.vm is None:
            raise _err(Code.FAILED_PRECONDITION, f"container {req.id} has no VM")
        if req.resources.type_url != RESOURCES_TYPE:
            raise _err(
                Code.INVALID_ARGUMENT,
                f"resources of type {req.resources.type_url!r}: expected {RESOURCES_TYPE}",
            )
        try:
            res = json.loads(req.resources.value or b"{}")
        except ValueError as e:
            raise _err(Code.INVALID_ARGUMENT, f"resources: {e}") from e
        if not isinstance(res, dict):
            raise _err(Code.INVALID_ARGUMENT, "resources: not an OCI LinuxResources object")
        try:
            limits = resources_from_oci(res).files()
        except (TypeError, ValueError, AttributeError) as e:
            raise _err(Code.INVALID_ARGUMENT, f"resources: {e}") from e
        await self.vm.update(req.id, limits)
        vcpus, memory_mb = _vm_size(res)
        if vcpus is not None or memory_mb is not None:
            await self.vm.resize(vcpus, memory_mb)
        return empty_pb2.Empty()

    async def stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        self._container(req.id)
        if self.vm is None:
            raise _err(Code.FAILED_PRECONDITION, f"container {req.id} has no VM")
        return pb.StatsResponse(stats=pack(_metrics(await self.vm.stats(req.id))))

    async def connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self._pid())

    async def shutdown(self, req: pb.ShutdownRequest) -> empty_pb2.Empty:
        log.debug("shutdown: received (%d containers)", len(self.containers))
        if self.containers and not req.now:
            return empty_pb2.Empty()
        self._shutdown()
        return empty_pb2.Empty()

    async def close(self) -> None:
        """Stop every process and the VM; unmount what is mounted."""
        if self._ending is not None:
            await self._ending
            self._ending = None
        for sending in list(self._signalling):
            await _cancel(sending)
        for c in list(self.containers.values()):
            await _cancel(c.oom_watch)
            for p in (c.init, *c.execs.values()):
                if p.runner is not None:
                    p.runner.cancel()
                    with contextlib.suppress(BaseException):
                        await p.runner
                elif p.io is not None:
                    await p.io.close()
            if c.mounted:
                await _umount(c.rootfs)
        self.containers.clear()
        if self.vm is not None:
            vm, self.vm = self.vm, None
            await vm.stop()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _metrics(s: dict[str, int]) -> metrics_pb2.Metrics:
    """containerd's cgroups v2 Metrics (what its runc shim reports on a cgroup v2 host) from a
    container cgroup's counters (`PodVM.stats`)."""
    memory = {
        f.name: s[f"memory.stat.{f.name}"]
        for f in metrics_pb2.MemoryStat.DESCRIPTOR.fields
        if f"memory.stat.{f.name}" in s
    }
    return metrics_pb2.Metrics(
        pids=metrics_pb2.PidsStat(current=s.get("pids.current", 0), limit=s.get("pids.max", 0)),
        cpu=metrics_pb2.CPUStat(
            **{
                f.name: s[f"cpu.stat.{f.name}"]
                for f in metrics_pb2.CPUStat.DESCRIPTOR.fields
                if f"cpu.stat.{f.name}" in s
            }
        ),
        memory=metrics_pb2.MemoryStat(
            **memory,
            usage=s.get("memory.current", 0),
            usage_limit=s.get("memory.max", 0),
            swap_usage=s.get("memory.swap.current", 0),
            swap_limit=s.get("memory.swap.max", 0),
        ),
        memory_events=metrics_pb2.MemoryEvents(
            **{
                f.name: s[f"memory.events.{f.name}"]
                for f in metrics_pb2.MemoryEvents.DESCRIPTOR.fields
                if f"memory.events.{f.name}" in s
            }
        ),
    )


def _read_spec(bundle: str) -> dict[str, Any]:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise _err(Code.INVALID_ARGUMENT, f"bundle {bundle} has no config.json") from None
    except (OSError, ValueError) as e:
        raise _err(Code.INVALID_ARGUMENT, f"{path}: {e}") from e
    if not isinstance(spec, dict):
        raise _err(Code.INVALID_ARGUMENT, f"{path}: not an OCI runtime spec")
    return spec


def _oci_process(spec: dict[str, Any], bundle: str) -> dict[str, Any]:
    process = spec.get("process")
    if not isinstance(process, dict):
        raise _err(Code.INVALID_ARGUMENT, f"{bundle}/config.json has no process")
    return process


def _vm_size(res: dict[str, Any]) -> tuple[int | None, int | None]:
    """vCPUs and memory (MiB) for the VM from OCI LinuxResources, as Kata sizes it."""
    cpu = res.get("cpu") or {}
    vcpus = None
    quota, period = cpu.get("quota"), cpu.get("period")
    if isinstance(quota, int) and isinstance(period, int) and quota > 0 and period > 0:
        vcpus = -(-quota // period)
    limit = (res.get("memory") or {}).get("limit")
    memory_mb = -(-limit // (1 << 20)) if isinstance(limit, int) and limit > 0 else None
    return vcpus, memory_mb


async def _mount_rootfs(mounts: list[mount_pb2.Mount], target: str) -> bool:
    """Mount the snapshotter's mounts at the bundle's rootfs (one mount, as containerd sends);
    False when there is nothing to mount (the bundle's rootfs is already there)."""
    if not mounts:
        return False
    if len(mounts) > 1:
        raise _err(Code.INVALID_ARGUMENT, f"{len(mounts)} rootfs mounts: expected one")
    m = mounts[0]
    os.makedirs(target, exist_ok=True)
    options = [o for o in m.options if o not in ("rbind",)]
    argv = ["mount", "-t", "none" if m.type in ("bind", "rbind") else m.type]
    if m.type in ("bind", "rbind"):
        options.append("rbind" if m.type == "rbind" or "rbind" in m.options else "bind")
    if options:
        argv += ["-o", ",".join(options)]
    argv += [m.source, target]
    cp = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
    if cp.returncode != 0:
        raise VMError(f"mounting the rootfs ({m.type}) at {target}: {cp.stderr.strip()}")
    return True


async def _umount(target: str) -> None:
    """Detach the rootfs mount (a system call: no `umount` process on the Delete's path)."""
    from ..factory.tmpfs import unmount

    try:
        await asyncio.to_thread(unmount, target)
    except OSError as e:
        log.error("unmounting %s: %s", target, e)
