"""OCI hooks (config.json's `hooks`), run on the host as Kata runs them: `prestart` and
`createRuntime` when the container is created, `poststart` once its process runs,
`poststop` once it is deleted; each gets the container's OCI state on stdin, the hook's own
`env` only, and is killed when it outlives its `timeout`.

As the runtime spec says: a failing `prestart` or `createRuntime` hook fails the create
(the hooks after it do not run; the container is deleted and its `poststop` hooks run); a
failing `poststart` or `poststop` hook is a warning and the others still run.
`createContainer` and `startContainer` hooks run in the container's namespaces, which are
inside the guest: they are refused by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import HostError

log = logging.getLogger(__name__)

HOST_HOOKS = ("prestart", "createRuntime", "poststart", "poststop")
"""The hooks run on the host, in the order of the container's lifecycle."""
GUEST_HOOKS = ("createContainer", "startContainer")
STATE_KEYS = ("ociVersion", "bundle", "annotations")
"""What `hooks_from_oci` keeps of the config beside the hooks, for the state hooks get."""
OUTPUT_TAIL = 500
"""Characters of a failed hook's output its error quotes."""


def hooks_from_oci(
    doc: dict[str, Any], bundle: str, refuse: Callable[[str], Exception]
) -> dict[str, Any]:
    """config.json's `hooks` -> {kind: [{path, args, env, timeout}], "ociVersion",
    "bundle", "annotations"}; {} without hooks. Malformed hooks and those the guest would
    have to run are refused by name."""
    hooks = doc.get("hooks") or {}
    if not isinstance(hooks, dict):
        raise refuse("hooks must be an object")
    out: dict[str, Any] = {}
    for kind, items in hooks.items():
        if kind in GUEST_HOOKS:
            if items:
                raise refuse(
                    f"hooks.{kind} run in the container's namespaces, in the guest: not supported"
                )
            continue
        if kind not in HOST_HOOKS:
            raise refuse(f"unknown hook kind hooks.{kind}")
        if not isinstance(items, list):
            raise refuse(f"hooks.{kind} must be a list")
        out[kind] = [_hook(h, f"hooks.{kind}[{i}]", refuse) for i, h in enumerate(items)]
    if not any(out.values()):
        return {}
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise refuse("annotations must be an object")
    out.update(ociVersion=str(doc.get("ociVersion") or "1.0.2"), bundle=bundle)
    out["annotations"] = {str(k): str(v) for k, v in annotations.items()}
    return out


def _hook(h: Any, where: str, refuse: Callable[[str], Exception]) -> dict[str, Any]:
    if not isinstance(h, dict):
        raise refuse(f"{where} must be an object")
    path = h.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise refuse(f"{where}: path {path!r} must be an absolute path")
    args, env = h.get("args"), h.get("env") or []
    for name, value in (("args", args or []), ("env", env)):
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise refuse(f"{where}.{name} must be a list of strings")
    if not all("=" in e for e in env):
        raise refuse(f"{where}.env entries must be KEY=VALUE")
    timeout = h.get("timeout")
    if timeout is not None and (
        not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise refuse(f"{where}.timeout {timeout!r} must be a number of seconds > 0")
    return {"path": path, "args": list(args or [path]), "env": list(env), "timeout": timeout}


def state(hooks: dict[str, Any], container_id: str, status: str, pid: int) -> bytes:
    """The OCI state document a hook reads on stdin (`pid`: the VMM's, as Kata gives it;
    left out when 0)."""
    doc: dict[str, Any] = {"ociVersion": hooks["ociVersion"], "id": container_id}
    doc["status"] = status
    if pid:
        doc["pid"] = pid
    doc.update(bundle=hooks["bundle"], annotations=hooks["annotations"])
    return json.dumps(doc).encode()


async def run_hooks(
    hooks: dict[str, Any], kind: str, container_id: str, status: str, pid: int = 0
) -> None:
    """Run the `kind` hooks in order; `HostError` naming the first that fails (the rest do
    not run)."""
    stdin = state(hooks, container_id, status, pid) if hooks else b""
    for i, hook in enumerate(hooks.get(kind) or []):
        await _run(hook, f"container {container_id}: hooks.{kind}[{i}] {hook['path']}", stdin)


async def run_hooks_warning(
    hooks: dict[str, Any], kind: str, container_id: str, status: str, pid: int = 0
) -> None:
    """Run every `kind` hook in order; a failure is logged as a warning, the rest still run."""
    stdin = state(hooks, container_id, status, pid) if hooks else b""
    for i, hook in enumerate(hooks.get(kind) or []):
        where = f"container {container_id}: hooks.{kind}[{i}] {hook['path']}"
        try:
            await _run(hook, where, stdin)
        except HostError as e:
            log.warning("%s", e)


async def _run(hook: dict[str, Any], where: str, stdin: bytes) -> None:
    env = dict(e.split("=", 1) for e in hook["env"])
    try:
        proc = await asyncio.create_subprocess_exec(
            hook["args"][0],
            *hook["args"][1:],
            executable=hook["path"],
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        raise HostError(f"{where} cannot be run: {e.strerror}") from None
    try:
        output, _ = await asyncio.wait_for(proc.communicate(stdin), hook["timeout"])
    except TimeoutError:
        raise HostError(f"{where} timed out after {hook['timeout']} s (killed)") from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: the hook and its children go
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
    if proc.returncode != 0:
        text = output.decode(errors="replace").strip()[-OUTPUT_TAIL:]
        raise HostError(f"{where} failed (exit status {proc.returncode}): {text}")
