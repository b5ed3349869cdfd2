"""The zygote's wire format and how a command finds its zygote, without a zygote: requests
survive the round trip (any bytes in argv and environment), malformed ones are refused by
name, the client's paths agree with the server's, and the client stays cheap to import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtcontainers import persist
from virtcontainers.factory import paths
from virtcontainers.zygote import client, protocol


def roundtrip(req: protocol.Request) -> protocol.Request:
    data = protocol.encode_request(req)
    head = data[: protocol.header_size()]
    body = data[protocol.header_size() :]
    assert protocol.body_size(head) == len(body)
    return protocol.decode_request(body)


def test_a_request_round_trips() -> None:
    env = {"FOO": "a=b=c", "EMPTY": "", "BYTES": "\udcff\udcfe"}  # not UTF-8: kept
    req = protocol.Request("virtc", ["virtc", "run", "", "--", "a b"], env, "/tmp", 0o027)
    got = roundtrip(req)
    assert (got.entry, got.argv, got.env, got.cwd, got.umask) == (
        "virtc",
        ["virtc", "run", "", "--", "a b"],
        env,
        "/tmp",
        0o027,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (["virtc", "/"], "expected at least 4"),
        (["sh", "/", "18", "0"], "unknown entry point 'sh'"),
        (["virtc", "relative", "18", "0"], "cwd 'relative' is not absolute"),
        (["virtc", "/", "18", "5", "x"], "bad argc '5'"),
        (["virtc", "/", "0o22", "0"], "bad argc '0' or umask '0o22'"),
        (["virtc", "/", "18", "0", "NOEQUALS"], "bad environment entry 'NOEQUALS'"),
    ],
)
def test_bad_requests_are_refused_by_name(fields: list[str], message: str) -> None:
    body = b"".join(len(f).to_bytes(4, "big") + f.encode() for f in fields)
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.decode_request(body)


def test_truncated_and_oversized_requests_are_refused() -> None:
    with pytest.raises(protocol.ProtocolError, match="truncated field"):
        protocol.decode_request(b"\0\0\0\x09virtc")
    with pytest.raises(protocol.ProtocolError, match="bad magic"):
        protocol.body_size(b"HTTP/1.1")
    with pytest.raises(protocol.ProtocolError, match="too large"):
        protocol.body_size(protocol.MAGIC + (protocol.MAX_REQUEST + 1).to_bytes(4, "big"))


def test_exit_statuses_round_trip() -> None:
    for kind, value in ((protocol.EXITED, 7), (protocol.KILLED, 9)):
        assert protocol.decode_status(protocol.encode_status(kind, value)) == (kind, value)
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_status(b"Q" + bytes(8))


def test_the_client_finds_the_socket_the_server_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VC_RUN_ROOT", "/tmp/vc-zyg")
    assert client.socket_in("/tmp/vc-zyg") == paths.zygote_socket("/tmp/vc-zyg")
    assert client.virtc_sockets(["list"]) == [paths.zygote_socket()]
    assert client.virtc_sockets(["--run-root", "/r", "run", "x"]) == [paths.zygote_socket("/r")]
    assert client.virtc_sockets(["--run-root=/r", "-H", "qemu", "ps"]) == ["/r/factory/zygote.sock"]
    # `factory` commands start and stop the zygote: they always run in their own process.
    assert client.virtc_sockets(["--debug", "factory", "destroy"]) == []
    assert client.virtc_sockets(["--debug"]) == []
    monkeypatch.delenv("VC_RUN_ROOT")
    assert client.DEFAULT_RUN_ROOT == persist.DEFAULT_ROOT_RUN_ROOT


def test_no_zygote_means_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert client.delegate("virtc", ["virtc", "list"], [f"{tmp_path}/none.sock"]) is None
    monkeypatch.setenv(protocol.DISABLE_ENV, "1")
    assert client.delegate("virtc", ["virtc", "list"], ["/nonexistent"]) is None


def test_the_client_imports_almost_nothing() -> None:
    code = "import sys; b=set(sys.modules); import virtcontainers.zygote.client; "
    code += "print(' '.join(sorted(set(sys.modules) - b)))"
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    allowed = {"_socket", "_signal", "_struct", "struct", "__future__"}
    assert {m for m in out if not m.startswith("virtcontainers")} <= allowed, out
    assert sorted(m for m in out if m.startswith("virtcontainers")) == [
        "virtcontainers",
        "virtcontainers.zygote",
        "virtcontainers.zygote.client",
        "virtcontainers.zygote.protocol",
    ]


def test_the_preload_builds_every_model_of_the_library() -> None:
    """A worker validates with models the zygote built: none is left to build per command."""
    from pydantic import BaseModel

    from virtcontainers.zygote.preload import preload

    assert preload() == []

    def subclasses(cls: type[BaseModel]) -> list[type[BaseModel]]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    ours = [m for m in subclasses(BaseModel) if m.__module__.startswith("virtcontainers.")]
    assert len(ours) >= 10
    assert [m.__qualname__ for m in ours if not m.__pydantic_complete__] == []


def test_the_shim_finds_the_zygote_beside_its_vm_cache_endpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VC_RUN_ROOT", str(tmp_path / "root"))
    config = tmp_path / "configuration.toml"
    monkeypatch.setenv("VC_SHIM_CONFIG", str(config))
    config.write_text("[factory]\nvm_cache_number = 1\n")
    assert client.shim_sockets() == []
    config.write_text('[factory]\nvm_cache_number = 1\nvm_cache_endpoint = "/srv/f/cache.sock"\n')
    assert client.shim_sockets() == ["/srv/f/zygote.sock"]
    # The run root's own zygote comes first when it is there.
    os.makedirs(tmp_path / "root" / "factory")
    (tmp_path / "root" / "factory" / "zygote.sock").touch()
    assert client.shim_sockets() == [str(tmp_path / "root" / "factory" / "zygote.sock")]
