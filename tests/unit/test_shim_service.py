"""The task service at the protocol level: containerd.task.v2.Task over ttrpc, events forwarded
over ttrpc to a stand-in of containerd's events service, the VM replaced by a fake PodVM.
(`tests/integration/test_shim_containerd.py` drives the real thing through containerd.)"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2

from virtcontainers.agent import ExitStatus
from virtcontainers.agent.client import AgentRequestError
from virtcontainers.containers import ProcessSpec as ContainerSpec
from virtcontainers.shim.events import EVENTS_SERVICE, Publisher
from virtcontainers.shim.main import (
    UsageError,
    group_id,
    parse,
    socket_path,
)
from virtcontainers.shim.proto.cgroups.v2.stats import metrics_pb2
from virtcontainers.shim.proto.containerd.api.services.ttrpc.events.v1 import events_pb2
from virtcontainers.shim.proto.containerd.api.types import mount_pb2
from virtcontainers.shim.proto.containerd.api.types.task import task_pb2 as tasktypes
from virtcontainers.shim.proto.containerd.pkg.runtimeoptions.v1 import api_pb2 as runtimeoptions
from virtcontainers.shim.proto.containerd.runtime.v2.task import shim_pb2 as pb
from virtcontainers.shim.service import PROCESS_TYPE, RESOURCES_TYPE, SERVICE, TaskService
from virtcontainers.shim.ttrpc import CallContext, Client, Code, Server, Service, TtrpcError
from virtcontainers.shim.vm import ProcessSpec, VMError, guest_bundle, joined_namespaces


class FakeStream:
    """An output stream of a FakeProcess: chunks until None."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.queue.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class FakeProcess:
    """A GuestProcess running a tiny command language: echo ARGS, exit N, sleep S, cat (stdin
    echoed as it comes, until it is closed), size (the terminal's size, then again after each
    resize, until killed)."""

    def __init__(self, args: list[str], tty: bool, rows: int, cols: int) -> None:
        self.args, self.tty, self.size = args, tty, (rows, cols)
        self.stdout, self.stderr = FakeStream(), FakeStream()
        self.stdin_closed = asyncio.Event()
        self.signals: list[int] = []
        self.resized = asyncio.Event()
        self.exit: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        cmd, *args = self.args
        status = 127
        if cmd == "echo":
            self.stdout.queue.put_nowait((" ".join(args) + "\n").encode())
            status = 0
        elif cmd == "exit":
            self.stderr.queue.put_nowait(b"bye\n")
            status = int(args[0])
        elif cmd == "sleep":
            await asyncio.sleep(float(args[0]))
            status = 0
        elif cmd == "cat":
            await self.stdin_closed.wait()
            status = 0
        elif cmd == "size":
            self.stdout.queue.put_nowait(f"{self.size[0]} {self.size[1]}\n".encode())
            await asyncio.Event().wait()
        self._end(ExitStatus(status))

    def _end(self, status: ExitStatus) -> None:
        if not self.exit.done():
            self.stdout.queue.put_nowait(None)
            self.stderr.queue.put_nowait(None)
            self.exit.set_result(status)

    async def write_stdin(self, data: bytes) -> None:
        if self.args[0] == "cat":
            self.stdout.queue.put_nowait(data)

    async def close_stdin(self) -> None:
        self.stdin_closed.set()

    async def signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.task.cancel()
        self._end(ExitStatus(-1, signal=sig))
        if self.args[-1] == "gone":  # had already exited in the guest: the agent says so
            raise AgentRequestError(f"signal {sig} to process 4", errno.ESRCH, "no such process")

    async def resize(self, rows: int, cols: int) -> None:
        assert self.tty
        self.size = (rows, cols)
        if self.args[0] == "size":
            self.stdout.queue.put_nowait(f"{rows} {cols}\n".encode())

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self.exit)


@dataclass
class FakeVM:
    """A PodVM whose processes are FakeProcesses."""

    calls: list[str] = field(default_factory=list)
    bundles: dict[str, str] = field(default_factory=dict)
    running: bool = False
    config_path: str = ""
    processes: dict[tuple[str, str], FakeProcess] = field(default_factory=dict)
    ooms: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    stats_values: dict[str, int] = field(default_factory=dict)
    guest_pids: dict[str, int] = field(default_factory=dict)
    """Container id -> the pid its task has once its process runs (else the VMM's)."""
    dying: asyncio.Event | None = None
    """When set, a stop lasts until it is set (a VM that takes its time to die)."""
    oom_end: asyncio.Event | None = None
    """When set, an OOM watch's end lasts until it is set."""
    oom_ends: list[str] = field(default_factory=list)
    """The containers whose OOM watch began to end."""
    kill_answer: asyncio.Event | None = None
    """When set, the guest answers a kill (its process ended at once) only once it is set, and
    fails if the VM was stopped meanwhile (as the guest's /bin/kill does under load)."""

    @property
    def pid(self) -> int:
        return 4242

    def task_pid(self, container_id: str) -> int:
        if (container_id, "") in self.processes:
            return self.guest_pids.get(container_id, self.pid)
        return self.pid

    async def start(self) -> None:
        self.calls.append("start")
        self.running = True

    async def add_container(self, container_id: str, bundle: str) -> None:
        self.calls.append(f"add {container_id}")
        self.bundles[container_id] = bundle

    async def start_process(
        self, container_id: str, exec_id: str, process: ProcessSpec, rows: int, cols: int
    ) -> FakeProcess:
        proc = FakeProcess(process.args, process.terminal, rows, cols)
        self.processes[container_id, exec_id] = proc
        return proc

    async def kill(self, container_id: str, sig: int) -> None:
        await self.processes[container_id, ""].signal(sig)
        if self.kill_answer is not None:
            await self.kill_answer.wait()
            if not self.running:
                raise VMError("the VM's agent went away during the request")

    async def pids(self, container_id: str) -> list[int]:
        return [1, 7]

    async def oom_kills(self, container_id: str) -> AsyncIterator[int]:
        try:
            while True:
                yield await self.ooms.get()
        finally:
            self.oom_ends.append(container_id)
            if self.oom_end is not None:  # its guest process's kill (an agent call) hangs
                await self.oom_end.wait()

    async def remove_container(self, container_id: str) -> None:
        self.calls.append(f"remove {container_id}")

    async def pause(self) -> None:
        self.calls.append("pause")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def stats(self, container_id: str) -> dict[str, int]:
        return self.stats_values

    async def update(self, container_id: str, files: dict[str, str]) -> None:
        self.calls.append(f"update {container_id} {sorted(files.items())}")

    async def resize(self, vcpus: int | None, memory_mb: int | None) -> None:
        self.calls.append(f"resize {vcpus} {memory_mb}")

    async def stop(self, *, force: bool = False) -> None:
        self.calls.append("kill" if force else "stop")
        if self.dying is not None:
            await self.dying.wait()
        self.running = False
        if self.kill_answer is not None:
            self.kill_answer.set()


@dataclass
class Shim:
    client: Client
    vm: FakeVM
    service: TaskService
    events: list[tuple[str, str]]
    dir: Path
    shutdown: asyncio.Event
    server: Server
    created: list[str] = field(default_factory=list)

    async def call(self, method: str, request: object, response: type = empty_pb2.Empty) -> object:
        return await self.client.call(SERVICE, method, request, response, timeout=10)  # type: ignore[arg-type]

    def bundle(self, cid: str, process: dict[str, object] | None = None) -> str:
        path = self.dir / cid
        path.mkdir(exist_ok=True)
        spec = {"ociVersion": "1.0.2", "process": process or {"args": ["echo", "hi"], "cwd": "/"}}
        (path / "config.json").write_text(json.dumps(spec))
        return str(path)

    async def create(self, cid: str, args: list[str], **kw: object) -> pb.CreateTaskResponse:
        bundle = self.bundle(cid, {"args": args, "cwd": "/"})
        out = f"file://{self.dir}/{cid}.log"
        req = pb.CreateTaskRequest(id=cid, bundle=bundle, stdout=out, stderr=out, **kw)  # type: ignore[arg-type]
        return await self.call("Create", req, pb.CreateTaskResponse)  # type: ignore[return-value]

    async def wait_events(self, n: int) -> list[tuple[str, str]]:
        for _ in range(200):
            if len(self.events) >= n:
                break
            await asyncio.sleep(0.01)
        return self.events


@pytest.fixture
async def shim(tmp_path: Path) -> AsyncIterator[Shim]:
    events: list[tuple[str, str]] = []
    ev_svc = Service(EVENTS_SERVICE)

    async def forward(ctx: CallContext, req: events_pb2.ForwardRequest) -> empty_pb2.Empty:
        events.append((req.envelope.topic, req.envelope.event.type_url))
        assert req.envelope.namespace == "ns1"
        return empty_pb2.Empty()

    ev_svc.unary("Forward", events_pb2.ForwardRequest, forward)
    ev_server = Server([ev_svc])
    await ev_server.listen(str(tmp_path / "events.sock"))
    vm = FakeVM()
    stop = asyncio.Event()
    publisher = Publisher("ns1", ttrpc_address=f"unix://{tmp_path / 'events.sock'}")

    def new_vm(shim_id: str, bundle: str, config_path: str) -> FakeVM:
        vm.config_path = config_path
        return vm

    created: list[str] = []
    service = TaskService(
        new_vm, publisher, "ns1", "shim1", shutdown=stop.set, created=lambda: created.append("c")
    )
    server = Server([service.service()])
    await server.listen(str(tmp_path / "shim.sock"))
    client = await Client.connect(str(tmp_path / "shim.sock"))
    yield Shim(client, vm, service, events, tmp_path, stop, server, created)
    await client.close()
    await server.close()
    await service.close()
    await publisher.close()
    await ev_server.close()


async def test_lifecycle_output_exit_and_event_order(shim: Shim) -> None:
    created = await shim.create("c1", ["exit", "3"])
    assert created.pid == 4242
    state = await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)
    assert state.status == tasktypes.CREATED  # type: ignore[attr-defined]
    waiting = asyncio.ensure_future(shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse))
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    waited = await asyncio.wait_for(waiting, 10)
    assert waited.exit_status == 3  # type: ignore[attr-defined]
    state = await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)
    assert state.status == tasktypes.STOPPED  # type: ignore[attr-defined]
    assert state.exit_status == 3  # type: ignore[attr-defined]
    deleted = await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)
    assert deleted.exit_status == 3  # type: ignore[attr-defined]
    assert (shim.dir / "c1.log").read_bytes() == b"bye\n"
    events = await shim.wait_events(4)
    assert events == [
        ("/tasks/create", "containerd.events.TaskCreate"),
        ("/tasks/start", "containerd.events.TaskStart"),
        ("/tasks/exit", "containerd.events.TaskExit"),
        ("/tasks/delete", "containerd.events.TaskDelete"),
    ]
    assert shim.vm.calls == ["start", "add c1", "remove c1"]
    with pytest.raises(TtrpcError) as info:
        await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)
    assert info.value.code == Code.NOT_FOUND


async def test_a_task_is_known_by_the_pid_the_vm_gives_once_its_process_runs(
    shim: Shim,
) -> None:
    """Created, a task has the VMM's pid; started, the one the VM gives it (a pod's later
    containers: the guest pid of their process, which CRI names their namespaces by): Start's
    answer, State and Delete say it; an exec keeps the VMM's."""
    shim.vm.guest_pids["c2"] = 77
    created = await shim.create("c2", ["sleep", "30"])
    assert created.pid == 4242
    started = await shim.call("Start", pb.StartRequest(id="c2"), pb.StartResponse)
    assert started.pid == 77  # type: ignore[attr-defined]
    state = await shim.call("State", pb.StateRequest(id="c2"), pb.StateResponse)
    assert state.pid == 77  # type: ignore[attr-defined]
    spec = any_pb2.Any(type_url=PROCESS_TYPE, value=json.dumps({"args": ["sleep", "9"]}).encode())
    await shim.call("Exec", pb.ExecProcessRequest(id="c2", exec_id="e", spec=spec))
    started = await shim.call("Start", pb.StartRequest(id="c2", exec_id="e"), pb.StartResponse)
    assert started.pid == 4242  # type: ignore[attr-defined]
    await shim.call("Kill", pb.KillRequest(id="c2", signal=9))
    await shim.call("Wait", pb.WaitRequest(id="c2"), pb.WaitResponse)
    await shim.call("Delete", pb.DeleteRequest(id="c2", exec_id="e"), pb.DeleteResponse)
    deleted = await shim.call("Delete", pb.DeleteRequest(id="c2"), pb.DeleteResponse)
    assert deleted.pid == 77  # type: ignore[attr-defined]


async def test_deleting_the_shims_own_container_kills_its_vm_at_once(shim: Shim) -> None:
    """The VM made for the shim's own container (a `ctr run`'s, a pod's sandbox once its
    containers are gone) is killed when that container is deleted: no container removal in
    the guest first, no shutdown left for later. Delete answers as the kill begins (the
    container's state is final); the shim's end (`close`, after Shutdown) waits for the VM's."""
    await shim.create("app", ["sleep", "30"])
    await shim.create("shim1", ["exit", "0"])
    await shim.call("Start", pb.StartRequest(id="shim1"), pb.StartResponse)
    await shim.call("Wait", pb.WaitRequest(id="shim1"), pb.WaitResponse)
    await shim.call("Delete", pb.DeleteRequest(id="shim1"), pb.DeleteResponse)
    assert shim.vm.calls == ["start", "add app", "add shim1", "remove shim1"]  # app still runs
    await shim.call("Kill", pb.KillRequest(id="app", signal=signal.SIGKILL))
    await shim.call("Wait", pb.WaitRequest(id="app"), pb.WaitResponse)
    await shim.create("shim1", ["exit", "0"])
    await shim.call("Delete", pb.DeleteRequest(id="app"), pb.DeleteResponse)
    assert shim.vm.running
    shim.vm.dying = dying = asyncio.Event()
    try:
        delete = shim.call("Delete", pb.DeleteRequest(id="shim1"), pb.DeleteResponse)
        await asyncio.wait_for(delete, 5)
        assert shim.vm.calls[-2:] == ["remove app", "kill"] and shim.vm.running
        await shim.call("Shutdown", pb.ShutdownRequest(id="shim1"))
        assert shim.shutdown.is_set()
        closing = asyncio.ensure_future(shim.service.close())
        await asyncio.sleep(0.1)
        assert not closing.done()
    finally:
        dying.set()
    await asyncio.wait_for(closing, 5)
    assert shim.vm.calls[-1] == "kill" and not shim.vm.running


async def test_the_vms_kill_does_not_wait_for_the_oom_watch_to_end(shim: Shim) -> None:
    """The OOM watch of a container is a guest process, killed through the agent when the
    watch ends: at the Delete of the shim's last container that process goes with the VM, so
    Delete answers and the VM's kill begins without waiting for that call; the shim's end
    (`close`) still waits for the watch to be over."""
    await shim.create("shim1", ["exit", "0"])
    await shim.call("Start", pb.StartRequest(id="shim1"), pb.StartResponse)
    await shim.call("Wait", pb.WaitRequest(id="shim1"), pb.WaitResponse)
    shim.vm.oom_end = asyncio.Event()  # never set: the watcher's kill never answers
    await asyncio.wait_for(shim.call("Delete", pb.DeleteRequest(id="shim1"), pb.DeleteResponse), 5)
    for _ in range(100):
        if "kill" in shim.vm.calls:
            break
        await asyncio.sleep(0.01)
    assert shim.vm.calls[-1] == "kill" and shim.vm.oom_ends == ["shim1"]
    await shim.call("Shutdown", pb.ShutdownRequest(id="shim1"))
    await asyncio.wait_for(shim.service.close(), 5)
    assert not shim.vm.running
    assert [t for t in asyncio.all_tasks() if "_watch_oom" in repr(t.get_coro())] == []


async def test_output_to_fifos(shim: Shim) -> None:
    out, err = shim.dir / "out", shim.dir / "err"
    os.mkfifo(out)
    os.mkfifo(err)
    rout = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    rerr = os.open(err, os.O_RDONLY | os.O_NONBLOCK)
    try:
        bundle = shim.bundle("f1", {"args": ["echo", "via", "fifo"]})
        await shim.call(
            "Create", pb.CreateTaskRequest(id="f1", bundle=bundle, stdout=str(out), stderr=str(err))
        )
        await shim.call("Start", pb.StartRequest(id="f1"), pb.StartResponse)
        await shim.call("Wait", pb.WaitRequest(id="f1"), pb.WaitResponse)
        assert os.read(rout, 100) == b"via fifo\n"
    finally:
        os.close(rout)
        os.close(rerr)


async def test_pod_containers_share_one_vm(shim: Shim) -> None:
    """A pod's later container is made in the VM of its first, addressed by its own id: its
    own state, exit and events; deleting it leaves the other running, the VM stays."""
    await shim.create("pod", ["sleep", "30"])
    await shim.create("app", ["sleep", "30"])
    for cid in ("pod", "app"):
        await shim.call("Start", pb.StartRequest(id=cid), pb.StartResponse)
    assert shim.vm.calls == ["start", "add pod", "add app"]
    assert shim.vm.bundles == {"pod": str(shim.dir / "pod"), "app": str(shim.dir / "app")}
    await shim.call("Kill", pb.KillRequest(id="app", signal=signal.SIGKILL))
    waited = await shim.call("Wait", pb.WaitRequest(id="app"), pb.WaitResponse)
    assert waited.exit_status == 128 + signal.SIGKILL  # type: ignore[attr-defined]
    state = await shim.call("State", pb.StateRequest(id="pod"), pb.StateResponse)
    assert state.status == tasktypes.RUNNING  # type: ignore[attr-defined]
    await shim.call("Delete", pb.DeleteRequest(id="app"), pb.DeleteResponse)
    assert shim.vm.calls[-1] == "remove app" and shim.vm.running
    with pytest.raises(TtrpcError) as info:
        await shim.call("State", pb.StateRequest(id="app"), pb.StateResponse)
    assert info.value.code == Code.NOT_FOUND
    await shim.call("Shutdown", pb.ShutdownRequest(id="app"))
    assert not shim.shutdown.is_set()  # the pod's sandbox container still runs
    state = await shim.call("State", pb.StateRequest(id="pod"), pb.StateResponse)
    assert state.status == tasktypes.RUNNING  # type: ignore[attr-defined]
    await shim.call("Kill", pb.KillRequest(id="pod", signal=signal.SIGKILL))
    await shim.call("Wait", pb.WaitRequest(id="pod"), pb.WaitResponse)
    await shim.call("Delete", pb.DeleteRequest(id="pod"), pb.DeleteResponse)
    await shim.call("Shutdown", pb.ShutdownRequest(id="pod"))
    assert shim.shutdown.is_set()
    await shim.service.close()
    assert shim.vm.calls == ["start", "add pod", "add app", "remove app", "remove pod", "stop"]


async def test_exec_lifecycle_and_errors(shim: Shim) -> None:
    await shim.create("c2", ["sleep", "30"])
    await shim.call("Start", pb.StartRequest(id="c2"), pb.StartResponse)
    spec = any_pb2.Any(type_url=PROCESS_TYPE, value=json.dumps({"args": ["echo", "x"]}).encode())
    out = f"file://{shim.dir}/e1.log"
    req = pb.ExecProcessRequest(id="c2", exec_id="e1", stdout=out, spec=spec)
    await shim.call("Exec", req)
    with pytest.raises(TtrpcError) as info:
        await shim.call("Exec", req)
    assert info.value.code == Code.ALREADY_EXISTS
    assert "e1" in info.value.message
    with pytest.raises(TtrpcError) as info:
        await shim.call("Exec", pb.ExecProcessRequest(id="nope", exec_id="e9", spec=spec))
    assert info.value.code == Code.NOT_FOUND
    bad = any_pb2.Any(type_url="some.Other", value=b"")
    with pytest.raises(TtrpcError) as info:
        await shim.call("Exec", pb.ExecProcessRequest(id="c2", exec_id="e2", spec=bad))
    assert info.value.code == Code.INVALID_ARGUMENT
    await shim.call("Start", pb.StartRequest(id="c2", exec_id="e1"), pb.StartResponse)
    waited = await shim.call("Wait", pb.WaitRequest(id="c2", exec_id="e1"), pb.WaitResponse)
    assert waited.exit_status == 0  # type: ignore[attr-defined]
    assert (shim.dir / "e1.log").read_bytes() == b"x\n"
    await shim.call("Delete", pb.DeleteRequest(id="c2", exec_id="e1"), pb.DeleteResponse)
    with pytest.raises(TtrpcError) as info:
        await shim.call("Kill", pb.KillRequest(id="c2", exec_id="e1", signal=9))
    assert info.value.code == Code.NOT_FOUND
    # Deleting a running init is refused; killing it ends it with 128+signal.
    with pytest.raises(TtrpcError) as info:
        await shim.call("Delete", pb.DeleteRequest(id="c2"), pb.DeleteResponse)
    assert info.value.code == Code.FAILED_PRECONDITION
    await shim.call("Kill", pb.KillRequest(id="c2", signal=signal.SIGTERM))
    waited = await shim.call("Wait", pb.WaitRequest(id="c2"), pb.WaitResponse)
    assert waited.exit_status == 128 + signal.SIGTERM  # type: ignore[attr-defined]
    await shim.call("Delete", pb.DeleteRequest(id="c2"), pb.DeleteResponse)
    topics = [t for t, _ in await shim.wait_events(8)]
    assert topics == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/delete",
        "/tasks/exit",
        "/tasks/delete",
    ]


async def test_kill_all_and_pids(shim: Shim) -> None:
    await shim.create("c3", ["sleep", "30"])
    await shim.call("Start", pb.StartRequest(id="c3"), pb.StartResponse)
    spec = any_pb2.Any(type_url=PROCESS_TYPE, value=json.dumps({"args": ["sleep", "30"]}).encode())
    await shim.call("Exec", pb.ExecProcessRequest(id="c3", exec_id="e1", spec=spec))
    await shim.call("Start", pb.StartRequest(id="c3", exec_id="e1"), pb.StartResponse)
    pids = await shim.call("Pids", pb.PidsRequest(id="c3"), pb.PidsResponse)
    assert len(pids.processes) == 2  # type: ignore[attr-defined]
    await shim.call("Kill", pb.KillRequest(id="c3", signal=9, all=True))
    for exec_id in ("", "e1"):
        waited = await shim.call("Wait", pb.WaitRequest(id="c3", exec_id=exec_id), pb.WaitResponse)
        assert waited.exit_status == 137  # type: ignore[attr-defined]


async def test_kill_all_when_an_exec_is_already_gone_in_the_guest(shim: Shim) -> None:
    """Kill --all races the execs' own exits (pid 1's death ends them): ESRCH is no error."""
    await shim.create("c9", ["sleep", "30"])
    await shim.call("Start", pb.StartRequest(id="c9"), pb.StartResponse)
    spec = any_pb2.Any(
        type_url=PROCESS_TYPE, value=json.dumps({"args": ["sleep", "30", "gone"]}).encode()
    )
    await shim.call("Exec", pb.ExecProcessRequest(id="c9", exec_id="e9", spec=spec))
    await shim.call("Start", pb.StartRequest(id="c9", exec_id="e9"), pb.StartResponse)
    await shim.call("Kill", pb.KillRequest(id="c9", signal=9, all=True))
    for exec_id in ("", "e9"):
        waited = await shim.call("Wait", pb.WaitRequest(id="c9", exec_id=exec_id), pb.WaitResponse)
        assert waited.exit_status == 137  # type: ignore[attr-defined]


async def test_a_kill_is_answered_once_its_process_has_exited(shim: Shim) -> None:
    """The guest answers a kill with a process of its own, whose end may be reported after the
    exit of the process it killed. Told of that exit, containerd deletes the task and shuts the
    shim down (its VM killed, its connections closed) before that answer: the kill has done its
    work and is answered at the exit (CRI's StopPodSandbox failed with "failed to kill sandbox
    container: ttrpc: closed")."""
    shim.vm.kill_answer = asyncio.Event()
    shim.vm.dying = asyncio.Event()  # QEMU takes its time to die
    await shim.create("shim1", ["sleep", "30"])
    await shim.call("Start", pb.StartRequest(id="shim1"), pb.StartResponse)
    kill = asyncio.ensure_future(shim.call("Kill", pb.KillRequest(id="shim1", signal=9)))
    waited = await shim.call("Wait", pb.WaitRequest(id="shim1"), pb.WaitResponse)
    assert waited.exit_status == 137  # type: ignore[attr-defined]
    # What containerd does on the exit event, the guest's answer to the kill still to come.
    await shim.call("Delete", pb.DeleteRequest(id="shim1"), pb.DeleteResponse)
    await shim.call("Shutdown", pb.ShutdownRequest(id="shim1"))
    assert shim.shutdown.is_set()
    # The shim server's end (daemon.py): its connections, then its VM.
    await shim.server.close()
    shim.vm.dying.set()
    await shim.service.close()
    assert await asyncio.wait_for(kill, 5) == empty_pb2.Empty()
    assert shim.vm.processes["shim1", ""].signals == [9]


async def test_pause_resume(shim: Shim) -> None:
    await shim.create("c4", ["sleep", "30"])
    await shim.call("Start", pb.StartRequest(id="c4"), pb.StartResponse)
    await shim.call("Pause", pb.PauseRequest(id="c4"))
    state = await shim.call("State", pb.StateRequest(id="c4"), pb.StateResponse)
    assert state.status == tasktypes.PAUSED  # type: ignore[attr-defined]
    with pytest.raises(TtrpcError) as info:
        await shim.call("Pause", pb.PauseRequest(id="c4"))
    assert info.value.code == Code.FAILED_PRECONDITION
    await shim.call("Resume", pb.ResumeRequest(id="c4"))
    state = await shim.call("State", pb.StateRequest(id="c4"), pb.StateResponse)
    assert state.status == tasktypes.RUNNING  # type: ignore[attr-defined]
    topics = [t for t, _ in await shim.wait_events(4)]
    assert topics[2:4] == ["/tasks/paused", "/tasks/resumed"]
    assert shim.vm.calls[-2:] == ["pause", "resume"]


async def test_bad_input_gets_clear_errors_and_no_vm(shim: Shim) -> None:
    bundle = shim.bundle("b1")
    opts = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"")
    with pytest.raises(TtrpcError) as info:
        await shim.call("Create", pb.CreateTaskRequest(id="b1", bundle=bundle, options=opts))
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "unknown runtime options type 'containerd.runc.v1.Options'" in info.value.message
    empty = shim.dir / "empty"
    empty.mkdir()
    with pytest.raises(TtrpcError) as info:
        await shim.call("Create", pb.CreateTaskRequest(id="b2", bundle=str(empty)))
    assert info.value.code == Code.INVALID_ARGUMENT
    assert f"bundle {empty} has no config.json" in info.value.message
    mount = mount_pb2.Mount(type="ext4", source="/dev/sdz", options=["rw"])
    with pytest.raises(TtrpcError) as info:
        await shim.call("Create", pb.CreateTaskRequest(id="b1", bundle=bundle, rootfs=[mount]))
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "rootfs mount type 'ext4'" in info.value.message
    with pytest.raises(TtrpcError) as info:
        await shim.call("Kill", pb.KillRequest(id="ghost", signal=9))
    assert info.value.code == Code.NOT_FOUND
    with pytest.raises(TtrpcError) as info:
        await shim.call("Checkpoint", pb.CheckpointTaskRequest(id="b1"))
    assert info.value.code == Code.UNIMPLEMENTED
    # Nothing started a VM, and the shim still serves.
    assert shim.vm.calls == []
    connected = await shim.call("Connect", pb.ConnectRequest(id="b1"), pb.ConnectResponse)
    assert connected.shim_pid == os.getpid()  # type: ignore[attr-defined]


async def test_created_is_called_once_after_the_first_create_that_succeeds(shim: Shim) -> None:
    """The server turns its cycle collector back on there (its imports are done)."""
    bundle = shim.bundle("bad", {"args": []})
    with pytest.raises(TtrpcError):
        await shim.call("Create", pb.CreateTaskRequest(id="bad", bundle=bundle))
    assert shim.created == []
    await shim.create("one", ["sleep", "30"])
    assert shim.created == ["c"]
    await shim.create("two", ["sleep", "30"])
    assert shim.created == ["c"]


async def test_create_twice_is_already_exists(shim: Shim) -> None:
    opts = runtimeoptions.Options(config_path="/etc/vc/alt.toml")
    packed = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString())
    await shim.create("d1", ["echo", "a"], options=packed)
    # CRI's runtime options choose the configuration of the pod's VM.
    assert shim.vm.config_path == "/etc/vc/alt.toml"
    with pytest.raises(TtrpcError) as info:
        await shim.create("d1", ["echo", "a"])
    assert info.value.code == Code.ALREADY_EXISTS


async def test_stats_update_shutdown(shim: Shim) -> None:
    await shim.create("s1", ["sleep", "30"])
    shim.vm.stats_values = {
        "memory.current": 3 << 20,
        "memory.max": 64 << 20,
        "memory.stat.anon": 1 << 20,
        "memory.events.oom_kill": 2,
        "cpu.stat.usage_usec": 1500,
        "pids.current": 3,
    }
    stats = await shim.call("Stats", pb.StatsRequest(id="s1"), pb.StatsResponse)
    # What containerd's runc shim reports for a container on a cgroup v2 host.
    assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"  # type: ignore[attr-defined]
    metrics = metrics_pb2.Metrics.FromString(stats.stats.value)  # type: ignore[attr-defined]
    assert (metrics.memory.usage, metrics.memory.usage_limit) == (3 << 20, 64 << 20)
    assert metrics.memory.anon == 1 << 20
    assert metrics.memory_events.oom_kill == 2
    assert (metrics.cpu.usage_usec, metrics.pids.current) == (1500, 3)
    res = {
        "cpu": {"quota": 150000, "period": 100000},
        "memory": {"limit": 512 << 20},
        "pids": {"limit": 50},
    }
    resources = any_pb2.Any(type_url=RESOURCES_TYPE, value=json.dumps(res).encode())
    await shim.call("Update", pb.UpdateTaskRequest(id="s1", resources=resources))
    # The VM grows as Kata sizes it, and the container's cgroup gets the limits.
    assert shim.vm.calls[-2:] == [
        "update s1 [('cpu.max', '150000 100000'), ('memory.max', '536870912'), ('pids.max', '50')]",
        "resize 2 512",
    ]
    bad = any_pb2.Any(type_url=RESOURCES_TYPE, value=b"[1]")
    with pytest.raises(TtrpcError) as info:
        await shim.call("Update", pb.UpdateTaskRequest(id="s1", resources=bad))
    assert info.value.code == Code.INVALID_ARGUMENT
    # Shutdown while a container exists does nothing; after its delete it stops the shim.
    await shim.call("Shutdown", pb.ShutdownRequest(id="s1"))
    assert not shim.shutdown.is_set()
    await shim.call("Kill", pb.KillRequest(id="s1", signal=9))
    await shim.call("Delete", pb.DeleteRequest(id="s1"), pb.DeleteResponse)
    await shim.call("Shutdown", pb.ShutdownRequest(id="s1"))
    assert shim.shutdown.is_set()


def fifos(shim: Shim, name: str) -> tuple[str, str, str]:
    paths = tuple(str(shim.dir / f"{name}-{s}") for s in ("in", "out", "err"))
    for path in paths:
        os.mkfifo(path)
    return paths  # type: ignore[return-value]


async def read_until(fd: int, want: bytes, timeout: float = 10) -> bytes:
    """Read a FIFO (non-blocking) until `want` has arrived."""
    got = b""
    async with asyncio.timeout(timeout):
        while want not in got:
            try:
                got += os.read(fd, 4096)
            except BlockingIOError:
                await asyncio.sleep(0.01)
    return got


async def test_output_and_stdin_stream_while_the_process_runs(shim: Shim) -> None:
    stdin, stdout, stderr = fifos(shim, "s")
    rout = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
    rerr = os.open(stderr, os.O_RDONLY | os.O_NONBLOCK)
    try:
        bundle = shim.bundle("st", {"args": ["cat"]})
        req = pb.CreateTaskRequest(
            id="st", bundle=bundle, stdin=stdin, stdout=stdout, stderr=stderr
        )
        await shim.call("Create", req)
        # The client's writer connects once the shim opens stdin (as ctr's pending open does).
        opening = asyncio.ensure_future(asyncio.to_thread(os.open, stdin, os.O_WRONLY))
        await shim.call("Start", pb.StartRequest(id="st"), pb.StartResponse)
        win = await opening
        try:
            for line in (b"first\n", b"second\n"):
                os.write(win, line)
                # Echoed back while the process still runs: nothing waits for its end.
                assert (await read_until(rout, line)) == line
                state = await shim.call("State", pb.StateRequest(id="st"), pb.StateResponse)
                assert state.status == tasktypes.RUNNING  # type: ignore[attr-defined]
            os.write(win, b"last\n")
        finally:
            os.close(win)
        await shim.call("CloseIO", pb.CloseIORequest(id="st", stdin=True))
        waited = await shim.call("Wait", pb.WaitRequest(id="st"), pb.WaitResponse)
        assert waited.exit_status == 0  # type: ignore[attr-defined]
        # Written before the close: it still reached the process.
        assert (await read_until(rout, b"last\n")) == b"last\n"
        # The output FIFOs were closed by the time Wait answered (the client reads them to
        # their end before it deletes the process).
        assert os.read(rout, 10) == b""
    finally:
        os.close(rout)
        os.close(rerr)


async def test_closeio_without_a_writer_ends_stdin(shim: Shim) -> None:
    stdin, _, _ = fifos(shim, "c")
    bundle = shim.bundle("ci", {"args": ["cat"]})
    out = f"file://{shim.dir}/ci.log"
    await shim.call("Create", pb.CreateTaskRequest(id="ci", bundle=bundle, stdin=stdin, stdout=out))
    await shim.call("Start", pb.StartRequest(id="ci"), pb.StartResponse)
    waited = await shim.call("Wait", pb.WaitRequest(id="ci"), pb.WaitResponse)
    # No writer ever connected: after the grace period stdin is at its end and cat is done.
    assert waited.exit_status == 0  # type: ignore[attr-defined]


async def test_exec_exit_does_not_wait_for_its_stdin(shim: Shim) -> None:
    """A client keeping an exec's stdin open (a terminal, say) still sees the exec end."""
    await shim.create("xs", ["sleep", "30"])
    await shim.call("Start", pb.StartRequest(id="xs"), pb.StartResponse)
    stdin, stdout, _ = fifos(shim, "x")
    rout = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
    spec = any_pb2.Any(type_url=PROCESS_TYPE, value=json.dumps({"args": ["echo", "x"]}).encode())
    await shim.call(
        "Exec",
        pb.ExecProcessRequest(id="xs", exec_id="e", stdin=stdin, stdout=stdout, spec=spec),
    )
    opening = asyncio.ensure_future(asyncio.to_thread(os.open, stdin, os.O_WRONLY))
    await shim.call("Start", pb.StartRequest(id="xs", exec_id="e"), pb.StartResponse)
    win = await opening
    try:
        waited = await shim.call("Wait", pb.WaitRequest(id="xs", exec_id="e"), pb.WaitResponse)
        assert waited.exit_status == 0  # type: ignore[attr-defined]
        assert (await read_until(rout, b"x\n")) == b"x\n"
        assert os.read(rout, 10) == b""
    finally:
        os.close(win)
        os.close(rout)


async def test_resize_pty_reaches_the_terminal(shim: Shim) -> None:
    bundle = shim.bundle("tt", {"args": ["size"], "terminal": True})
    out = f"file://{shim.dir}/tt.log"
    req = pb.CreateTaskRequest(id="tt", bundle=bundle, stdout=out, terminal=True)
    await shim.call("Create", req)
    # A size given before the start is the terminal's first.
    await shim.call("ResizePty", pb.ResizePtyRequest(id="tt", width=100, height=30))
    await shim.call("Start", pb.StartRequest(id="tt"), pb.StartResponse)
    await shim.call("ResizePty", pb.ResizePtyRequest(id="tt", width=120, height=40))
    with pytest.raises(TtrpcError) as info:
        await shim.call("ResizePty", pb.ResizePtyRequest(id="tt", width=0, height=40))
    assert info.value.code == Code.INVALID_ARGUMENT
    await shim.call("Kill", pb.KillRequest(id="tt", signal=9))
    await shim.call("Wait", pb.WaitRequest(id="tt"), pb.WaitResponse)
    assert (shim.dir / "tt.log").read_bytes() == b"30 100\n40 120\n"
    # Without a terminal there is nothing to resize.
    await shim.create("nt", ["sleep", "30"])
    with pytest.raises(TtrpcError) as info:
        await shim.call("ResizePty", pb.ResizePtyRequest(id="nt", width=80, height=24))
    assert info.value.code == Code.FAILED_PRECONDITION


async def test_oom_in_the_guest_is_a_task_oom_event(shim: Shim) -> None:
    await shim.create("om", ["sleep", "30"])
    await shim.call("Start", pb.StartRequest(id="om"), pb.StartResponse)
    shim.vm.ooms.put_nowait(1)
    events = await shim.wait_events(3)
    assert events[2] == ("/tasks/oom", "containerd.events.TaskOOM")
    await shim.call("Kill", pb.KillRequest(id="om", signal=9))
    await shim.call("Delete", pb.DeleteRequest(id="om"), pb.DeleteResponse)
    assert shim.service.containers == {}


# --- the binary's command line ----------------------------------------------------------------


def test_flags_in_go_syntax() -> None:
    f = parse(
        [
            "-namespace",
            "k8s.io",
            "--address=/run/c.sock",
            "-publish-binary",
            "/bin/c",
            "-id",
            "abc",
            "-debug",
            "start",
        ]
    )
    assert (f.namespace, f.address, f.publish_binary, f.id, f.debug, f.action) == (
        "k8s.io",
        "/run/c.sock",
        "/bin/c",
        "abc",
        True,
        "start",
    )
    with pytest.raises(UsageError, match="flag provided but not defined: -bogus"):
        parse(["-bogus", "1", "start"])
    with pytest.raises(UsageError, match="flag needs an argument: -id"):
        parse(["-id"])


def test_socket_path_and_pod_grouping(tmp_path: Path) -> None:
    a = socket_path("/run/containerd/containerd.sock", "default", "c1")
    assert a.startswith("/run/containerd/s/") and len(a) == len("/run/containerd/s/") + 64
    assert a != socket_path("/run/containerd/containerd.sock", "other", "c1")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "annotations": {
                    "io.kubernetes.cri.container-type": "container",
                    "io.kubernetes.cri.sandbox-id": "pod1",
                }
            }
        )
    )
    assert group_id("c2", str(tmp_path)) == "pod1"
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {}}))
    assert group_id("c2", str(tmp_path)) == "c2"
    with pytest.raises(UsageError, match=r"has no config\.json"):
        group_id("c2", str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("pid_ns", "joined"),
    [  # CRI's POD mode, TARGET mode, then CONTAINER mode (a pid namespace of its own)
        ({"type": "pid", "path": "/proc/7/ns/pid"}, {"pid": "pod1", "ipc": "pod1"}),
        ({"type": "pid", "path": "/proc/90/ns/pid"}, {"pid": "app", "ipc": "pod1"}),
        ({"type": "pid"}, {"ipc": "pod1"}),
    ],
)
def test_namespaces_joined_by_path_are_those_of_the_tasks_named(
    tmp_path: Path, pid_ns: dict[str, str], joined: dict[str, str]
) -> None:
    namespaces = [
        pid_ns,
        {"type": "ipc", "path": "/proc/7/ns/ipc"},
        {"type": "network", "path": "/proc/7/ns/net"},
        {"type": "mount"},
    ]
    spec = {"linux": {"namespaces": namespaces}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert joined_namespaces(str(tmp_path), {7: "pod1", 90: "app"}) == joined
    guest = json.loads((Path(guest_bundle(str(tmp_path))) / "config.json").read_text())
    # Namespaces joined by path are the host's: none reaches the guest's spec.
    kept = [ns for ns in namespaces if not ns.get("path")]
    assert guest["linux"]["namespaces"] == kept
    argv = ContainerSpec(args=["true"], joined=[("p", "/run/vc/c/pod1/pid")]).runner_argv("/r")
    assert argv[argv.index("--join-ns") + 1] == "p:/run/vc/c/pod1/pid"


@pytest.mark.parametrize(
    ("ns", "tasks", "message"),
    [
        (  # a host process's namespace: not in the VM
            {"type": "pid", "path": "/proc/1/ns/pid"},
            {7: "pod1"},
            "the pid namespace /proc/1/ns/pid is none of this pod's containers'",
        ),
        (  # not a task's path at all
            {"type": "uts", "path": "/run/uts/x"},
            {7: "pod1"},
            "the uts namespace /run/uts/x is none of this pod's containers'",
        ),
        (  # a task's, but of another type than the one named
            {"type": "ipc", "path": "/proc/7/ns/pid"},
            {7: "pod1"},
            "the ipc namespace /proc/7/ns/pid is none",
        ),
        (  # the first container has no task to join
            {"type": "pid", "path": "/proc/7/ns/pid"},
            {},
            "the pid namespace /proc/7/ns/pid is none",
        ),
        (
            {"type": "network", "path": "/run/netns/other"},
            {7: "pod1"},
            "the network namespace /run/netns/other is none",
        ),
        (
            {"type": "mount", "path": "/proc/7/ns/mnt"},
            {7: "pod1"},
            "joining the mount namespace of container pod1 (/proc/7/ns/mnt) is not supported",
        ),
    ],
)
def test_namespace_paths_of_no_task_are_refused_by_name(
    tmp_path: Path, ns: dict[str, str], tasks: dict[int, str], message: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"linux": {"namespaces": [ns]}}))
    with pytest.raises(VMError, match=re.escape(message)):
        joined_namespaces(str(tmp_path), tasks)


def mounted(path: str | Path) -> bool:
    """Whether `path` is a mount point (a bind within one filesystem included)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


async def test_a_mounted_root_is_unmounted_by_delete_or_after_the_vms_end(shim: Shim) -> None:
    """The root the shim mounted from containerd's mounts is unmounted: at a pod container's
    Delete, and after the VM's end for the shim's own container (whose Delete answers before)."""
    source = shim.dir / "snapshot"
    source.mkdir()
    (source / "f").write_text("x")
    mount = mount_pb2.Mount(type="bind", source=str(source), options=["rbind", "ro"])
    for cid in ("app", "shim1"):
        bundle = shim.bundle(cid, {"args": ["exit", "0"], "cwd": "/"})
        await shim.call("Create", pb.CreateTaskRequest(id=cid, bundle=bundle, rootfs=[mount]))
        assert mounted(f"{bundle}/rootfs") and os.listdir(f"{bundle}/rootfs") == ["f"]
    await shim.call("Delete", pb.DeleteRequest(id="app"), pb.DeleteResponse)
    assert not mounted(shim.dir / "app" / "rootfs")
    shim.vm.dying = dying = asyncio.Event()
    try:
        await shim.call("Delete", pb.DeleteRequest(id="shim1"), pb.DeleteResponse)
        assert mounted(shim.dir / "shim1" / "rootfs")  # the VM may still use it
    finally:
        dying.set()
    await shim.service.close()
    assert not mounted(shim.dir / "shim1" / "rootfs")
    assert os.listdir(source) == ["f"]
