"""The real C agent on its vsock path (as guest /init, pid 1), run on a host without vsock.

The agent serves vsock only as pid 1 with a virtio vsock device present, and must accept
only the host (CID 2): with vsock loopback (CID 1) or a peer guest (CID 3) a guest process
could otherwise run commands as guest root. The host has no vsock transport, so the agent
runs as pid 1 of its own user, pid, mount, net, uts and ipc namespaces (mapped to nobody on
the host, so its pid-1 set-up cannot touch the host), with `vsock_shim.c` preloaded: it
shows a fake virtio vsock device, turns the AF_VSOCK listener into an inherited Unix
socket, and makes accept4() report the peer as a sockaddr_vm whose CID is named by the path
the client bound its Unix socket to. The agent's own check decides.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaks import processes_mentioning
from virtcontainers.agent import protocol as p
from virtcontainers.agent.process import argv_fields
from virtcontainers.guest import initrd

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build it")

SHIM = Path(__file__).with_name("vsock_shim.c")
NOBODY = 65534
PROTECTED_SYMLINKS = "/proc/sys/fs/protected_symlinks"


class VsockAgent:
    """The agent, built dynamically (for the preload) from `source`, serving "vsock" as pid 1."""

    def __init__(self, workdir: str, source: bytes) -> None:
        self.workdir = workdir
        os.chmod(workdir, 0o755)
        binary = os.path.join(workdir, "init")
        shim = os.path.join(workdir, "vsock_shim.so")
        flags = ("-O2", "-Wall", "-Wextra")
        initrd.compile_c(source, initrd.AGENT_SOURCE, binary, workdir, "the guest agent", flags)
        initrd.compile_c(
            SHIM.read_bytes(),
            SHIM.name,
            shim,
            workdir,
            "the vsock shim",
            (*flags, "-shared", "-fPIC"),
        )
        virtio = os.path.join(workdir, "virtio", "virtio0")
        os.makedirs(virtio)
        Path(virtio, "device").write_text("0x0013\n")  # virtio device id 19: vsock
        self.marks = os.path.join(workdir, "marks")
        os.mkdir(self.marks)
        os.chmod(self.marks, 0o777)
        self.path = os.path.join(workdir, "listen.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o777)
        listener.listen(8)
        fd = listener.fileno()
        cmd = [
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child",
            "--mount", "--uts", "--net", "--ipc",
            "env", f"LD_PRELOAD={shim}", f"VC_SHIM_VIRTIO={os.path.dirname(virtio)}",
            f"VC_SHIM_LISTEN_FD={fd}", binary,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            pass_fds=[fd],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        listener.close()
        assert self.proc.stdout is not None
        self.lines: list[bytes] = []
        while (line := self.proc.stdout.readline()) != b"VC-AGENT-READY\n":
            assert line, f"the agent exited before serving: {self.lines}"
            self.lines.append(line)

    def connect(self, cid: int) -> socket.socket:
        """A connection whose peer the agent sees as vsock CID `cid`."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        name = os.path.join(self.workdir, f"cid-{cid}")
        if os.path.exists(name):
            os.unlink(name)
        s.bind(name)
        s.connect(self.path)
        return s

    def stop(self) -> bytes:
        """Kill it (unshare takes the pid namespace with it); returns its remaining console."""
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        rest = self.proc.stdout.read()
        self.proc.stdout.close()
        return b"".join(self.lines) + rest


@pytest.fixture(scope="module")
def agent() -> Iterator[VsockAgent]:
    before = Path(PROTECTED_SYMLINKS).read_text()
    # Not under /tmp, /run or /dev: the agent's pid-1 set-up mounts fresh filesystems there.
    d = tempfile.mkdtemp(prefix="vc-vsock-", dir="/var/tmp")
    a: VsockAgent | None = None
    try:
        a = VsockAgent(d, initrd.agent_source())
        yield a
    finally:
        if a is not None:
            a.stop()
        deadline = time.monotonic() + 10
        while processes_mentioning(d) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_mentioning(d) == []
        shutil.rmtree(d, ignore_errors=True)
        # Its pid-1 set-up (sysctls, modules, memory onlining) never reached the host.
        assert Path(PROTECTED_SYMLINKS).read_text() == before


def attack(agent: VsockAgent, cid: int) -> list[p.Frame]:
    """From CID `cid`: EXEC a command that leaves a mark, then PING; the frames answered."""
    mark = os.path.join(agent.marks, f"from-cid-{cid}")
    req = argv_fields("exec", ["touch", mark], None).encode()
    frames: list[p.Frame] = []
    with agent.connect(cid) as s:
        try:
            s.sendall(p.encode_frame(p.MsgType.EXEC, 1, req) + p.encode_frame(p.MsgType.PING, 2))
            dec = p.FrameDecoder()
            while len(frames) < 2 and (data := s.recv(65536)):
                frames += dec.feed(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the agent before or while we wrote
    return frames


def test_host_cid_is_served(agent: VsockAgent) -> None:
    frames = {f.id: f for f in attack(agent, 2)}
    assert frames[1].type == p.MsgType.EXEC | p.REPLY
    assert p.Fields.decode(frames[1].payload).int_(p.Tag.EXIT_CODE, -1) == 0
    assert frames[2].type == p.MsgType.PING | p.REPLY
    assert os.path.exists(os.path.join(agent.marks, "from-cid-2"))


@pytest.mark.parametrize("cid", [1, 3], ids=["loopback", "other-guest"])
def test_non_host_cid_is_refused(agent: VsockAgent, cid: int) -> None:
    assert attack(agent, cid) == []
    assert not os.path.exists(os.path.join(agent.marks, f"from-cid-{cid}"))
    # Refused, not wedged: the host is still served afterwards.
    served = {f.id: f.type for f in attack(agent, 2)}
    assert served == {1: p.MsgType.EXEC | p.REPLY, 2: p.MsgType.PING | p.REPLY}
    assert agent.proc.poll() is None
