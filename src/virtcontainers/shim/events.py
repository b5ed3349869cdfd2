"""Task events to containerd, in order: over ttrpc (`TTRPC_ADDRESS`, Events.Forward), or
through the publish binary (`containerd --address A publish`) when ttrpc cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from .proto.containerd.api.events import task_pb2 as events
from .proto.containerd.api.services.ttrpc.events.v1 import events_pb2
from .ttrpc import Client, TtrpcError

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"

#: containerd's runtime topics, by event message.
TOPICS: dict[type[Message], str] = {
    events.TaskCreate: "/tasks/create",
    events.TaskStart: "/tasks/start",
    events.TaskExit: "/tasks/exit",
    events.TaskDelete: "/tasks/delete",
    events.TaskExecAdded: "/tasks/exec-added",
    events.TaskExecStarted: "/tasks/exec-started",
    events.TaskPaused: "/tasks/paused",
    events.TaskResumed: "/tasks/resumed",
    events.TaskOOM: "/tasks/oom",
    events.TaskCheckpointed: "/tasks/checkpointed",
}


def pack(message: Message) -> any_pb2.Any:
    """An Any as containerd's typeurl writes it: the type URL is the bare full name."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


class Publisher:
    """Sends events one after another in the order they were published (a single worker)."""

    def __init__(
        self,
        namespace: str,
        ttrpc_address: str = "",
        publish_binary: str = "",
        containerd_address: str = "",
        attempts: int = 5,
    ) -> None:
        self.namespace = namespace
        self.ttrpc_address = ttrpc_address.removeprefix("unix://")
        self.publish_binary = publish_binary
        self.containerd_address = containerd_address
        self.attempts = attempts
        self._queue: asyncio.Queue[tuple[str, any_pb2.Any, timestamp_pb2.Timestamp] | None] = (
            asyncio.Queue()
        )
        self._client: Client | None = None
        self._worker: asyncio.Task[None] | None = None

    def publish(self, event: Message) -> None:
        """Queue an event; it is sent after every event queued before it."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())
        self._queue.put_nowait((TOPICS[type(event)], pack(event), now()))

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            topic, event, ts = item
            try:
                await self._send(topic, event, ts)
            except Exception as e:
                log.error("event %s not delivered: %s", topic, e)

    async def _send(self, topic: str, event: any_pb2.Any, ts: timestamp_pb2.Timestamp) -> None:
        envelope = events_pb2.Envelope(
            timestamp=ts, namespace=self.namespace, topic=topic, event=event
        )
        request = events_pb2.ForwardRequest(envelope=envelope)
        error: Exception | None = None
        for attempt in range(self.attempts):
            if not self.ttrpc_address:
                break
            try:
                if self._client is None:
                    self._client = await Client.connect(self.ttrpc_address, timeout=5)
                await self._client.call(
                    EVENTS_SERVICE, "Forward", request, empty_pb2.Empty, timeout=10
                )
                return
            except (TtrpcError, OSError, TimeoutError) as e:
                error = e
                await self._drop_client()
                await asyncio.sleep(0.05 * (attempt + 1))
        if not self.publish_binary:
            raise RuntimeError(f"no way to publish {topic}: {error}")
        await self._publish_binary(topic, event)

    async def _publish_binary(self, topic: str, event: any_pb2.Any) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.publish_binary,
            "--address",
            self.containerd_address,
            "publish",
            "--topic",
            topic,
            "--namespace",
            self.namespace,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(event.SerializeToString())
        if proc.returncode != 0:
            raise RuntimeError(
                f"{self.publish_binary} publish {topic} exited {proc.returncode}: "
                f"{err.decode(errors='replace').strip()}"
            )

    async def _drop_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.close()

    async def close(self, timeout: float = 10) -> None:
        """Deliver what is queued (up to `timeout` s), then stop."""
        if self._worker is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(self._worker, timeout)
            except TimeoutError:
                log.error("events still queued at shutdown were dropped")
            self._worker = None
        await self._drop_client()
