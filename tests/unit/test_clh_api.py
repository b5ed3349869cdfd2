"""The Cloud Hypervisor API client's error mapping, against canned HTTP answers on a Unix socket."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from virtcontainers.drivers.clh import ClhApi, ClhApiError
from virtcontainers.drivers.clh.api import error_text
from virtcontainers.errors import HypervisorError, VMExitedError, VMTimeoutError

Answer = Callable[[str], Awaitable[bytes | None]]


class CannedServer:
    """An HTTP/1.1 server on a Unix socket that answers each request with `answer(request)`."""

    def __init__(self, path: str, answer: Answer) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                request = lines[0] + (" " + body.decode() if body else "")
                self.requests.append(request)
                reply = await self.answer(request)
                if reply is None:
                    return  # hang up without answering
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> CannedServer:
        self.server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def http(status: int, body: bytes = b"", reason: str = "X") -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + body


@pytest.fixture
async def sock() -> AsyncIterator[str]:
    d = tempfile.mkdtemp(prefix="clha-", dir="/tmp")
    yield os.path.join(d, "api.sock")
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def canned(*replies: bytes | None) -> Answer:
    queue = list(replies)

    async def answer(_request: str) -> bytes | None:
        return queue.pop(0)

    return answer


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b'["Error booting VM", "VM is not created"]', "Error booting VM: VM is not created"),
        (b"[]", "(empty error list)"),
        (b"", "(empty body)"),
        (b"plain failure text", "plain failure text"),
        (b'{"unexpected": "object"}', '{"unexpected": "object"}'),
    ],
)
def test_error_text(body: bytes, text: str) -> None:
    assert error_text(body) == text


async def test_non_2xx_answers_are_errors_with_endpoint_and_chain(sock: str) -> None:
    answers = canned(
        http(500, b'["Error pausing VM", "Invalid transition from Created to Paused"]'),
        http(404, b'["Error adding disk", "VM is not created"]'),
        http(405, b""),
        http(409, b"conflict as text"),
        http(302, b""),
    )
    async with CannedServer(sock, answers):
        api = ClhApi(sock, timeout=2)
        try:
            with pytest.raises(ClhApiError) as ei:
                await api.pause()
            e = ei.value
            assert (e.method, e.endpoint, e.status) == ("PUT", "vm.pause", 500)
            assert str(e) == (
                "cloud-hypervisor PUT vm.pause failed with HTTP 500: "
                "Error pausing VM: Invalid transition from Created to Paused"
            )
            with pytest.raises(ClhApiError, match=r"vm\.add-disk failed with HTTP 404"):
                await api.add("disk", {"path": "/x"})
            with pytest.raises(ClhApiError, match=r"HTTP 405: \(empty body\)"):
                await api.resume()
            with pytest.raises(ClhApiError, match="HTTP 409: conflict as text"):
                await api.add("net", {"tap": "t"})
            with pytest.raises(ClhApiError, match="HTTP 302"):
                await api.boot()
        finally:
            await api.close()


async def test_2xx_answers(sock: str) -> None:
    answers = canned(
        http(204),
        http(200, b'{"id": "d0", "bdf": "0000:00:06.0"}'),
        http(200, b'{"config": {}, "state": "Running"}'),
        http(200, b"not json"),
        http(200, b'{"no": "state"}'),
    )
    async with CannedServer(sock, answers) as server:
        api = ClhApi(sock, timeout=2)
        try:
            await api.boot()  # 204: no body
            assert await api.add("disk", {"path": "/x", "id": "d0"}) == {
                "id": "d0",
                "bdf": "0000:00:06.0",
            }
            assert (await api.info())["state"] == "Running"
            with pytest.raises(HypervisorError, match="not JSON"):
                await api.ping()
            with pytest.raises(HypervisorError, match="unexpected answer"):
                await api.info()
        finally:
            await api.close()
    assert server.requests[0] == "PUT /api/v1/vm.boot HTTP/1.1"
    assert server.requests[1] == 'PUT /api/v1/vm.add-disk HTTP/1.1 {"path":"/x","id":"d0"}'


async def test_no_answer_is_a_timeout(sock: str) -> None:
    async def slow(_request: str) -> bytes | None:
        await asyncio.sleep(5)
        return http(204)

    async with CannedServer(sock, slow):
        api = ClhApi(sock, timeout=0.3)
        try:
            with pytest.raises(VMTimeoutError, match=r"PUT vm\.boot: no answer within 0\.3s"):
                await api.boot()
        finally:
            await api.close()


async def test_hang_up_is_an_error_naming_the_socket_or_the_death(sock: str) -> None:
    async with CannedServer(sock, canned(None, None)):
        api = ClhApi(sock, timeout=2)
        try:
            with pytest.raises(HypervisorError, match="cannot reach the API socket") as ei:
                await api.boot()
            assert not isinstance(ei.value, VMExitedError)
        finally:
            await api.close()

        async def died() -> str:
            return "exited with code 134"

        api = ClhApi(sock, timeout=2, exited=died)
        try:
            with pytest.raises(VMExitedError, match=r"PUT vm\.boot: the VMM exited with code 134"):
                await api.boot()
        finally:
            await api.close()


async def test_missing_socket(sock: str) -> None:
    api = ClhApi(sock, timeout=1)
    with pytest.raises(HypervisorError, match=f"cannot reach the API socket {sock}"):
        await api.ping()
    await api.close()
