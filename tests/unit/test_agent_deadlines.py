"""Every agent request ends, even when the guest never answers: no `wait_for` around the calls
here (the deadlines under test are the client's own; pytest's timeout catches a hang)."""

from __future__ import annotations

import pytest
from test_agent_client import agent, sockdir

from virtcontainers.agent import AgentClient, AgentTimeoutError, ExecResult
from virtcontainers.agent import protocol as p
from virtcontainers.agent.client import DEFAULT_REQUEST_TIMEOUT
from virtcontainers.agent.fake import ExecRequest, FakeAgent
from virtcontainers.errors import AgentError

__all__ = ["agent", "sockdir"]  # the fake agent and its directory (fixtures)

pytestmark = pytest.mark.timeout(30)

SHORT = 0.3


async def test_default_deadline_is_set_without_being_asked(agent: FakeAgent) -> None:
    async with await AgentClient.connect(agent.path, 5) as c:
        assert c.request_timeout == DEFAULT_REQUEST_TIMEOUT > 0
    for bad in (0, -1, float("nan"), None, True):
        with pytest.raises(AgentError, match="request_timeout"):
            await AgentClient.connect(agent.path, 5, request_timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("op", "call", "cancelled"),
    [
        ("ping", lambda c: c.ping(), False),
        ("read_file /etc/x", lambda c: c.read_file("/etc/x"), True),
        ("write_file /etc/x", lambda c: c.write_file("/etc/x", b"data"), True),
        ("exec ['sleep', '1']", lambda c: c.exec(["sleep", "1"]), True),
        ("exec ['true']", lambda c: c.exec(["true"], timeout=0.1), True),
        ("set_time", lambda c: c.set_time(), False),
    ],
)
async def test_a_silent_agent_fails_each_request_naming_it(
    agent: FakeAgent, op: str, call: object, cancelled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An exec's own timeout gets a grace period on top: keep it short here.
    monkeypatch.setattr("virtcontainers.agent.client.EXEC_GRACE", SHORT)
    async with await AgentClient.connect(agent.path, 5, request_timeout=SHORT) as c:
        agent.silent = True
        with pytest.raises(AgentTimeoutError, match=op.replace("[", r"\[")) as info:
            await call(c)  # type: ignore[operator]
        assert c.target in str(info.value)
        assert not c.closed  # one lost request does not end the connection
        agent.silent = False
        assert (await c.ping()).version == agent.version  # also: the cancel has arrived
        sent = [f.type for f in agent.requests]
        assert (p.MsgType.CANCEL in sent) == cancelled


async def test_a_long_exec_on_a_live_agent_outlasts_the_deadline(agent: FakeAgent) -> None:
    """The liveness pings keep a long exec going as long as the agent answers them."""

    async def slow(req: ExecRequest) -> ExecResult:
        import asyncio

        await asyncio.sleep(6 * SHORT)
        return ExecResult(0, b"done", b"")

    agent.exec_handler = slow
    async with await AgentClient.connect(agent.path, 5, request_timeout=SHORT) as c:
        res = await c.exec(["slow"])
        assert res.stdout == b"done"
        pings = sum(f.type == p.MsgType.PING for f in agent.requests)
        assert pings >= 2  # the client did check on the agent meanwhile


async def test_vm_wait_agent_honours_its_timeout(
    sockdir: str, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virtcontainers.agent import AgentEndpoint
    from virtcontainers.drivers.mock import MockHypervisor
    from virtcontainers.factory.vm import VM

    hv = MockHypervisor(sockdir)

    async def healthy() -> None:
        return None

    monkeypatch.setattr(hv, "check", healthy)
    vm = VM(hv, AgentEndpoint.unix(agent.path), cpu=1, memory_mb=256)
    agent.silent = True  # the hello is answered, the ping never
    try:
        with pytest.raises(AgentTimeoutError, match="ping within"):
            await vm.wait_agent(SHORT)
    finally:
        await vm.close_agent()
