"""AgentClient.wait_hardware against the in-process fake agent: request fields, results,
timeouts, client-side validation and cancellation."""

from __future__ import annotations

import asyncio
import errno

import pytest
from test_agent_client import agent, client, sockdir

from virtcontainers.agent import AgentClient, AgentRequestError, WaitResult
from virtcontainers.agent import protocol as p
from virtcontainers.agent.fake import FakeAgent
from virtcontainers.errors import AgentError

__all__ = ["agent", "client", "sockdir"]  # the fake agent and a client of it (fixtures)


def last_wait(agent: FakeAgent) -> p.Fields:
    frame = [f for f in agent.requests if f.type == p.MsgType.WAIT][-1]
    return p.Fields.decode(frame.payload)


async def test_request_fields(client: AgentClient, agent: FakeAgent) -> None:
    agent.block_devices["data"] = "sdb"
    agent.cpus_online = 2
    res = await client.wait_hardware(block_serial="data", cpus=2, memory=True, timeout=1.5)
    assert res == WaitResult(device="sdb", dev_path="/dev/sdb", cpus_online=2, mem_blocks=0)
    f = last_wait(agent)
    assert f.str_(p.Tag.SERIAL) == "data"
    assert (f.int_(p.Tag.WANT_CPUS), f.int_(p.Tag.MEMORY), f.int_(p.Tag.TIMEOUT_MS)) == (2, 1, 1500)


async def test_only_what_is_asked_is_sent_and_returned(
    client: AgentClient, agent: FakeAgent
) -> None:
    res = await client.wait_hardware(cpus=1, timeout=1)
    assert res == WaitResult(device=None, dev_path=None, cpus_online=1, mem_blocks=0)
    f = last_wait(agent)
    assert f.get(p.Tag.SERIAL) is None and f.get(p.Tag.MEMORY) is None


async def test_returns_once_the_hardware_appears(client: AgentClient, agent: FakeAgent) -> None:
    task = asyncio.create_task(client.wait_hardware(block_serial="late", cpus=2, timeout=10))
    await asyncio.sleep(0.05)
    agent.block_devices["late"] = "vdc"
    await asyncio.sleep(0.05)
    assert not task.done()  # still one vCPU
    agent.cpus_online = 2
    res = await asyncio.wait_for(task, 5)
    assert (res.device, res.cpus_online) == ("vdc", 2)


async def test_timeout_is_an_etimedout_error_naming_what_is_missing(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError, match="ETIMEDOUT") as info:
        await client.wait_hardware(block_serial="never", cpus=3, timeout=0.05)
    assert info.value.errno == errno.ETIMEDOUT
    assert "'never'" in info.value.message and "1 of 3 CPUs" in info.value.message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout": 1}, "nothing to wait for"),
        ({"block_serial": "", "timeout": 1}, "block_serial"),
        ({"block_serial": "a\0b", "timeout": 1}, "block_serial"),
        ({"block_serial": "x" * 256, "timeout": 1}, "block_serial"),
        ({"cpus": 0, "timeout": 1}, "cpus"),
        ({"cpus": True, "timeout": 1}, "cpus"),
        ({"cpus": 2.0, "timeout": 1}, "cpus"),
        ({"cpus": 1, "timeout": 0}, "timeout"),
        ({"cpus": 1, "timeout": 601}, "timeout"),
    ],
)
async def test_bad_arguments(
    client: AgentClient, agent: FakeAgent, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(AgentError, match=match):
        await client.wait_hardware(**kwargs)  # type: ignore[arg-type]
    assert not any(f.type == p.MsgType.WAIT for f in agent.requests)


async def test_fake_refuses_bad_fields_like_the_agent(client: AgentClient) -> None:
    bad = p.fields((p.Tag.SERIAL, "x"), (p.Tag.TIMEOUT_MS, b"\x01"))
    with pytest.raises(AgentRequestError, match="EINVAL"):
        await client._call("wait", p.MsgType.WAIT, bad)
    with pytest.raises(AgentRequestError, match="timeout_ms"):
        await client._call("wait", p.MsgType.WAIT, p.fields((p.Tag.SERIAL, "x")))
