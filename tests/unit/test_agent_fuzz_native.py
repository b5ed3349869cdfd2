"""Fuzz the C agent past its framing: frames with valid headers (so every handler is reached)
and mutated TLV payloads, against a host build with AddressSanitizer and UBSan.

The sanitized agent runs jailed, since fuzzed requests do run commands, write files and
configure the network: as user nobody, in new mount, pid, network and UTS namespaces (tmpfs
over /tmp, /var/tmp and /dev/shm; when the jail's first process dies the kernel ends every
process left in it). A sanitizer report
kills the agent (halt on the first error), which the liveness check after each example sees;
its report is on the agent's stderr, shown by the failure."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtcontainers.agent import protocol as p
from virtcontainers.guest import initrd

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build it"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the jail (namespaces, setpriv) needs root"),
    pytest.mark.timeout(600),
]

NOBODY = 65534
JAIL = (
    "mount -t tmpfs -o mode=1777 jail /tmp && mount -t tmpfs -o mode=1777 jail /var/tmp && "
    "mount -t tmpfs -o mode=1777 jail /dev/shm && "
    f'setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- "$@" & wait'
)


class JailedAgent:
    """The ASan/UBSan agent, serving on a Unix socket from inside the jail."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        binary = os.path.join(workdir, "init-asan")
        initrd.compile_agent(binary, workdir, sanitize=True)
        os.chmod(workdir, 0o755)
        sockdir = os.path.join(workdir, "sock")
        os.mkdir(sockdir, 0o700)
        os.chown(sockdir, NOBODY, NOBODY)
        self.path = os.path.join(sockdir, "agent.sock")
        self.stderr = open(os.path.join(workdir, "stderr"), "w+b")  # noqa: SIM115
        env = dict(
            os.environ,
            ASAN_OPTIONS="abort_on_error=1:detect_leaks=0:halt_on_error=1",
            UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        )
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--net", "--uts", "--fork", "--kill-child",
             "--propagation", "private",
             "sh", "-c", JAIL, "jail", binary, "--unix", self.path],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"VC-AGENT-READY\n", self.report()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def report(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-6000:]

    def stop(self) -> None:
        self.proc.kill()  # --kill-child: the jail's processes go with it
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.stderr.close()


@pytest.fixture(scope="module")
def jailed() -> Iterator[JailedAgent]:
    d = tempfile.mkdtemp(prefix="vc-fuzz-", dir="/run")  # the jail hides /tmp
    agent = JailedAgent(d)
    try:
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(d, ignore_errors=True)


def _int(v: int) -> bytes:
    return struct.pack("<q", v)


T, G = p.MsgType, p.Tag
RELEVANT: dict[int, list[int]] = {
    T.HELLO: [G.NONCE],
    T.PING: [],
    T.EXEC: [G.ARGV, G.ENV, G.CWD, G.STDIN, G.TIMEOUT_MS, G.MAX_OUTPUT],
    T.START: [G.ARGV, G.ENV, G.CWD, G.UID, G.GID, G.GROUPS, G.ROOT, G.TTY, G.ROWS, G.COLS,
              G.DETACH, G.NAMESPACES, G.HOSTNAME, G.TIMEOUT_MS],
    T.READ_FILE: [G.PATH],
    T.WRITE_FILE: [G.PATH, G.DATA, G.MODE, G.FLAGS],
    T.SET_TIME: [G.SEC, G.NSEC],
    T.ADD_ENTROPY: [G.DATA],
    T.CANCEL: [G.TARGET, G.SIGNAL],
    T.ONLINE: [G.FLAGS],
    T.WAIT: [G.TIMEOUT_MS, G.SERIAL, G.WANT_CPUS, G.MEMORY],
    T.STDIN: [G.PROC, G.DATA, G.CLOSE],
    T.SIGNAL: [G.PROC, G.SIGNAL],
    T.RESIZE: [G.PROC, G.ROWS, G.COLS],
    T.ATTACH: [G.PROC],
    T.NETWORK: [G.LINK, G.ROUTE, G.NEIGH, G.HOSTNAME, G.HOSTS, G.RESOLV, G.TIMEOUT_MS],
}  # fmt: skip
"""Per request type, the tags its handler reads: most generated fields use them."""
values = st.one_of(
    st.binary(max_size=48),
    st.integers(-(2**63), 2**63 - 1).map(_int),
    st.integers(-2, 70).map(_int),  # process handles, signals, small sizes, flags
    st.sampled_from([2**31, 2**32, 2**32 - 1, 600001, 65536, 0x7FFFFFFF, 0x20000000]).map(_int),
    st.sampled_from([b"/nonexistent/x", b"true", b"cat", b"sh", b"/", b"/tmp/f", b"/tmp/d/e",
                     b"", b"A=b", b"=x", b"/dev/null", b"/proc/self/status", b"\x00", b"/tmp"]),
)  # fmt: skip


NESTED = (G.LINK, G.ROUTE, G.NEIGH)
"""Tags whose value is a payload of its own (NETWORK's links, routes, neighbours)."""
net_values = st.one_of(
    st.sampled_from([b"02:aa:00:00:00:01", b"02:aa:00:00:00:0", b"zz:aa:00:00:00:01",
                     b"10.1.0.2/24", b"10.1.0.2/33", b"fd00::2/64", b"fd00::2/-1", b"10.1.0.1",
                     b"fd00::1", b"::/0", b"0.0.0.0/0", b"1.2.3.4/", b"/8", b"1.2.3.4/8x"]),
    st.integers(-2, 70000).map(_int),
    values,
)  # fmt: skip
nested = st.lists(
    st.tuples(st.sampled_from([G.MAC, G.MTU, G.ADDRESS, G.DEST, G.GATEWAY, G.FAMILY, G.LLADDR]),
              net_values),
    max_size=6,
).map(lambda items: p.Fields(list(items)).encode())  # fmt: skip


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame with a valid header (type, id, length, CRC) and a mutated TLV payload."""
    type_ = draw(st.one_of(st.sampled_from(list(RELEVANT)), st.integers(0, 255)))
    tags = RELEVANT.get(type_) or [int(t) for t in p.Tag]
    tag = st.one_of(st.sampled_from(tags), st.sampled_from(list(p.Tag)), st.integers(0, 0xFFFF))
    items = draw(st.lists(st.tuples(tag, values), max_size=12))
    if type_ == T.NETWORK:
        items += draw(st.lists(st.tuples(st.sampled_from(NESTED), nested), max_size=6))
        items.insert(0, (G.TIMEOUT_MS, _int(draw(st.integers(0, 50)))))
    if type_ in (T.EXEC, T.START) and draw(st.booleans()):
        items.insert(0, (G.ARGV, draw(st.sampled_from([b"true", b"cat", b"/nonexistent"]))))
    payload = bytearray(p.Fields(list(items)).encode())
    for _ in range(draw(st.integers(0, 2))):
        if not payload:
            break
        kind = draw(st.sampled_from(["flip", "truncate", "length", "insert"]))
        pos = draw(st.integers(0, len(payload) - 1))
        if kind == "flip":
            payload[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del payload[pos:]
        elif kind == "length" and pos + 6 <= len(payload):
            payload[pos + 2 : pos + 6] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        else:
            payload[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return p.encode_frame(type_, draw(st.integers(1, p.MAX_ID - 1)), bytes(payload))


def ping_after(jailed: JailedAgent, stream: bytes) -> None:
    """Send `stream` on a fresh connection, then a ping: its reply must come."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(jailed.path)
        s.sendall(stream + p.encode_frame(p.MsgType.PING, p.MAX_ID))
        dec = p.FrameDecoder()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            data = s.recv(1 << 16)
            assert data, f"agent closed the connection\n{jailed.report()}"
            if any(f.id == p.MAX_ID and f.type == p.MsgType.PING | p.REPLY for f in dec.feed(data)):
                return
        raise AssertionError(f"no answer to the ping\n{jailed.report()}")


@given(st.lists(frames(), min_size=1, max_size=6))
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_mutated_requests_never_crash_the_sanitized_agent(
    jailed: JailedAgent, stream: list[bytes]
) -> None:
    ping_after(jailed, b"".join(stream))
    assert jailed.alive(), jailed.report()


def test_the_sanitizers_are_really_on(jailed: JailedAgent) -> None:
    """The build is instrumented (a sanitizer report would stop it): its binary links the
    ASan and UBSan runtimes, and the agent serves the whole protocol."""
    out = subprocess.run(
        ["ldd", os.path.join(jailed.workdir, "init-asan")], capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    assert "libasan" in out and "libubsan" in out
    ping_after(
        jailed, p.encode_frame(p.MsgType.EXEC, 5, p.Fields().add(p.Tag.ARGV, "true").encode())
    )
