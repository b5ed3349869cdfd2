"""Containers in a real QEMU guest (TCG): an imported image's root over virtio-fs (an overlay
the guest cannot write through to the store), volumes read-write and read-only, the image
config and run options honoured, exec into a running container, kill, pids; bundles; bad
input refused before anything boots; nothing left behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from leaks import processes_mentioning
from virtcontainers import Sandbox, persist
from virtcontainers.containers import Container
from virtcontainers.errors import (
    ConfigError,
    HypervisorError,
    ImageError,
    StateError,
    UnsupportedError,
)
from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image, debian_image

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


@pytest.fixture(scope="module")
def store(images: ImageStore) -> ImageStore:
    """The busybox store (conftest's `images`)."""
    return images


def image_files(store: ImageStore) -> set[str]:
    return set(os.listdir(store.rootfs(store.get("busybox"))))


async def test_image_container_volumes_and_processes(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    rw = tmp_path / "rw"
    ro = tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "data.txt").write_text("read only\n")
    before = image_files(store)
    sb = Sandbox(
        image="busybox",
        image_store=store.root,
        mounts=[f"{rw}:/out", f"{ro}:/in:ro"],
        run_root=run_root,
    )
    async with sb:
        assert store.holders(store.get("busybox")) == [sb.id]
        with pytest.raises(ImageError, match=f"in use by sandbox {sb.id}"):
            store.remove("busybox")
        script = (
            "ls /; cat /in/data.txt; echo from-container > /out/new.txt; "
            "touch /in/x 2>&1; echo scratch > /scratch && cat /scratch; "
            'echo "$GREETING $PWD $(id -u):$(id -g) $(hostname)"; exit 7'
        )
        c = await sb.create_container(
            ["sh", "-c", script], env=["GREETING=hello"], cwd="/tmp", hostname="box"
        )
        result = await c.run()
        out = result.stdout.decode().splitlines()
        assert result.exit_code == 7, result
        # The container sees its image's files (and its mount points), not the guest's.
        listing = set(out[: out.index("read only")])
        assert listing == before | {"in", "out"}
        assert "read only" in out
        assert (rw / "new.txt").read_text() == "from-container\n"
        assert "Read-only file system" in result.stdout.decode()
        assert "scratch" in out
        assert out[-1] == "hello /tmp 0:0 box"
        # Writes went to the container's layer, never to the image store.
        assert image_files(store) == before
        # Even the guest's root cannot write through the read-only share.
        guest = await sb.exec(
            "mount -o remount,rw /run/vc/v/vc-v1; touch /run/vc/v/vc-v1/y && echo wrote"
        )
        assert b"wrote" not in guest.stdout
        assert not (ro / "y").exists()
        # The guest keeps a file's pages across opens (the share's default cache), yet still
        # sees the host's later change to it (same size, new bytes).
        (ro / "data.txt").write_text("READ ONLY\n")
        await asyncio.sleep(1.5)
        again = await sb.exec("cat /run/vc/v/vc-v1/data.txt")
        assert again.stdout == b"READ ONLY\n", again


async def test_exec_kill_pids(run_root: str, store: ImageStore) -> None:
    async with Sandbox(image="busybox", image_store=store.root, run_root=run_root) as sb:
        c = await sb.create_container(["sh", "-c", "echo started > /tmp/mark; exec sleep 600"])
        await c.setup()
        await c.start()
        await c.until_running()
        for _ in range(200):  # the container's shell writes its mark once it runs
            if (await c.exec(["test", "-s", "/tmp/mark"])).exit_code == 0:
                break
            await asyncio.sleep(0.05)
        inside = await c.exec(["sh", "-c", "cat /tmp/mark; id -u; pwd"], cwd="/etc")
        assert inside.stdout.decode().split() == ["started", "0", "/etc"]
        nobody = await c.exec(["id", "-u"], user=(65534, 65534))
        assert nobody.stdout.strip() == b"65534"
        assert len(await c.pids()) == 1  # sleep; the exec'd commands are gone
        await c.kill(signal.SIGKILL)
        result = await c.wait()
        assert result.exit_code == 128 + signal.SIGKILL
        await c.delete()
        assert (await sb.exec(["ls", "/run/vc/c"])).stdout == b""


async def test_image_containers_get_the_default_device_rules(
    run_root: str, store: ImageStore
) -> None:
    """A container from an image gets what Docker gives one: a device program allowing only
    runc's default devices. Holding CAP_MKNOD (a default capability) it can make a /dev/kmsg
    node (1:11) but not open it, in its first process and in what exec runs; /dev/null
    works."""
    write = "echo vc-devices > /tmp/kmsg; echo kmsg=$?; echo x > /dev/null; echo null=$?"
    probe = f"mknod /tmp/kmsg c 1 11 && echo made; {write}"
    async with Sandbox(image="busybox", image_store=store.root, run_root=run_root) as sb:
        c = await sb.create_container(["sh", "-c", f"({probe}) >/tmp/out 2>&1; exec sleep 600"])
        await c.setup()
        await c.start()
        await c.until_running()
        first = ""
        for _ in range(200):
            first = (await c.exec(["cat", "/tmp/out"])).stdout.decode()
            if "null=" in first:
                break
            await asyncio.sleep(0.05)
        again = await c.exec(["sh", "-c", write])
        await c.kill(signal.SIGKILL)
        await c.wait()
    denied = "sh: can't create /tmp/kmsg: Operation not permitted"
    assert first.splitlines() == ["made", denied, "kmsg=1", "null=0"], first
    assert again.stdout.decode().split() == ["kmsg=1", "null=0"], again
    assert again.stderr.decode().strip() == denied, again


async def test_bundle(run_root: str, store: ImageStore, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copytree(store.rootfs(store.get("busybox")), bundle / "rootfs", symlinks=True)
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "args": [
                "sh",
                "-c",
                "hostname; ulimit -n; grep CapEff /proc/self/status; "
                "touch /scratch/ok && echo scratch; touch /x",
            ],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_KILL"]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 123}],
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bundled",
        "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "uts"}]},
        # A mount point the read-only root lacks: made before the root turns read-only.
        "mounts": [{"destination": "/scratch", "type": "tmpfs", "source": "tmpfs"}],
    }
    (bundle / "config.json").write_text(json.dumps(config))
    async with Sandbox(bundle=str(bundle), run_root=run_root) as sb:
        c = await sb.create_container()
        result = await c.run()
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["bundled", "123"]
    assert lines[2].split() == ["CapEff:", f"{1 << 5:016x}"]
    assert lines[3] == "scratch"
    assert b"Read-only file system" in result.stderr
    assert result.exit_code == 1
    assert not (bundle / "rootfs" / "x").exists()

    config["hooks"] = {"startContainer": [{"path": "/bin/true"}]}
    (bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=r"hooks\.startContainer run in the container's"):
        await Sandbox(bundle=str(bundle), run_root=run_root).start()


async def test_bad_input_refused_before_boot(run_root: str, store: ImageStore) -> None:
    with pytest.raises(ImageError, match="unknown image reference 'nope:1'"):
        await Sandbox(image="nope:1", image_store=store.root, run_root=run_root).start()
    with pytest.raises(ConfigError, match="volume source /no/such/dir is not an existing"):
        Sandbox(image="busybox", mounts=["/no/such/dir:/x"], run_root=run_root)
    assert processes_mentioning(run_root) == []
    assert os.listdir(os.path.join(store.root, "leases")) == []


@pytest.mark.timeout(1200)  # the first build of the image (mmdebstrap) takes minutes
async def test_debian_python(run_root: str, tmp_path: Path) -> None:
    """A real distribution: Debian bookworm + python3 built by mmdebstrap (cached by its
    inputs; the first build takes minutes)."""
    store = ImageStore(str(tmp_path / "images"))
    (image,) = store.import_archive(debian_image())
    async with Sandbox(image=image.name, image_store=store.root, run_root=run_root) as sb:
        c = await sb.create_container(
            ["python3", "-c", "import ssl, sqlite3, json; print(ssl.OPENSSL_VERSION)"]
        )
        result = await c.run(timeout=120)
    assert result.exit_code == 0, result
    assert result.stdout.startswith(b"OpenSSL 3")


def virtc(run_root: str, store: ImageStore, *args: str) -> subprocess.CompletedProcess[str]:
    """`virtc ARGS`; `run` without a network (its default, a bridge, is tested in a test
    namespace by test_network_containers.py: not made in the host's)."""
    if args[0] == "run":
        args = ("run", "--net", "none", *args[1:])
    env = dict(os.environ, VC_RUN_ROOT=run_root, VC_IMAGE_ROOT=store.root)
    return subprocess.run(
        [sys.executable, "-m", "virtcontainers.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_cli_run_exec_ps(run_root: str, store: ImageStore, tmp_path: Path) -> None:
    """`virtc run --image` as a user types it: exit code passed through, -v/-e/-w/-u; then
    -d, exec into the container, ps, stop; bad input named."""
    (tmp_path / "in.txt").write_text("shared\n")
    tmp_path.chmod(0o755)  # readable by the container's user (nobody)
    done = virtc(
        run_root,
        store,
        "run",
        "--image",
        "busybox",
        "-v",
        f"{tmp_path}:/host",
        "-e",
        "K=v",
        "-w",
        "/host",
        "-u",
        "nobody",
        "--",
        "sh",
        "-c",
        "cat in.txt; echo $K; id -un; exit 5",
    )
    assert done.returncode == 5, done.stderr
    assert done.stdout.split() == ["shared", "v", "nobody"]

    sid = virtc(
        run_root,
        store,
        "run",
        "-d",
        "--image",
        "busybox",
        "--name",
        "cli-d2",
        "--",
        "sh",
        "-c",
        "echo ready > /tmp/r; exec sleep 600",
    )
    assert sid.stdout.strip() == "cli-d2", sid.stderr
    try:
        inside = virtc(run_root, store, "exec", "cli-d2", "--", "sh", "-c", "cat /tmp/r; hostname")
        assert inside.stdout.split() == ["ready", "cli-d2"], inside.stderr
        listed = virtc(run_root, store, "ps", "--json", "cli-d2")
        assert [p["command"] for p in json.loads(listed.stdout)] == ["sleep 600"]
        busy = virtc(run_root, store, "image", "rm", "busybox")
        assert busy.returncode == 1 and "in use by sandbox cli-d2" in busy.stderr
    finally:
        assert virtc(run_root, store, "stop", "cli-d2").returncode == 0

    missing = virtc(run_root, store, "run", "--image", "nope", "--", "true")
    assert missing.returncode == 1 and "unknown image reference 'nope'" in missing.stderr
    bad = virtc(run_root, store, "run", "--image", "busybox", "-v", "/no/dir:/x", "--", "true")
    assert bad.returncode == 2 and "volume source /no/dir is not an existing" in bad.stderr


def test_cli_run_userns(run_root: str, store: ImageStore, tmp_path: Path) -> None:
    """`virtc run --image --userns auto`: inside, the user is root and owns / and /bin/sh
    (the image's owners shifted in the container's overlay, the store's root untouched);
    outside, what it writes in a -v directory belongs to the mapped id; bad maps named."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, 100000, 100000)  # the container's root, outside
    script = (
        "id -u; id -g; stat -c '%u:%g' / /bin/sh /bin/busybox; cat /proc/self/uid_map;"
        " touch /shared/made; echo x > /etc/written && stat -c %u /etc/written"
    )
    args = ["run", "--net", "none", "--image", "busybox", "--userns", "auto"]
    done = virtc(run_root, store, *args, "-v", f"{shared}:/shared", "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0", *["0:0"] * 3, "0", "100000", "65536", "0"]
    made = (shared / "made").stat()
    assert (made.st_uid, made.st_gid) == (100000, 100000)
    lower = store.rootfs(store.get("busybox"))
    assert os.stat(os.path.join(lower, "bin", "busybox")).st_uid == 0
    # The shifted owners are a layer the store made once for the image and the shift: a
    # second container stacks the same one (not made again) and writes only its own upper.
    layer = Path(store.shifted_rootfs(store.get("busybox"), 100000))
    made_at = layer.stat().st_ino, layer.stat().st_mtime_ns
    assert (layer / "bin" / "busybox").lstat().st_uid == 100000
    assert (layer / "bin" / "busybox").stat().st_blocks * 512 < 64 << 10  # no data
    again = virtc(run_root, store, *args, "--", "sh", "-c", "stat -c %u /bin/sh; touch /etc/b")
    assert (again.returncode, again.stdout.split()) == (0, ["0"]), again.stderr
    assert (layer.stat().st_ino, layer.stat().st_mtime_ns) == made_at
    assert not (layer / "etc" / "b").exists() and not (layer / "etc" / "written").exists()

    bad = virtc(run_root, store, "run", "--image", "busybox", "--userns", "0:10", "--", "true")
    assert bad.returncode == 2 and "invalid userns '0:10'" in bad.stderr
    unmapped = virtc(run_root, store, *args[:-1], "1000:100", "-u", "200", "--", "true")
    assert unmapped.returncode == 2, unmapped.stderr
    assert "container uid 200 is not mapped by userns 1000:100" in unmapped.stderr
    alone = virtc(run_root, store, "run", "--userns", "auto", "--", "true")
    assert alone.returncode == 2 and "--userns needs --image" in alone.stderr
    pooled = virtc(run_root, store, *args, "--factory", "--", "true")
    assert pooled.returncode == 2 and "--userns cannot be used with" in pooled.stderr


def test_cli_cp(run_root: str, store: ImageStore, tmp_path: Path) -> None:
    """`virtc cp` both ways, files and directories, a volume path, and a container symlink
    that points at the host's /etc: the copy lands in the container's /etc."""
    vol = tmp_path / "vol"
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("in a tree\n")
    vol.mkdir()
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 << 20))
    args = ["run", "-d", "--image", "busybox", "--name", "cp1", "-v", f"{vol}:/vol"]
    started = virtc(run_root, store, *args, "--", "sleep", "600")
    assert started.returncode == 0, started.stderr
    try:
        assert virtc(run_root, store, "cp", str(blob), "cp1:/tmp/blob").returncode == 0
        assert virtc(run_root, store, "cp", str(tmp_path / "tree"), "cp1:/opt").returncode == 0
        inside = virtc(
            run_root, store, "exec", "cp1", "--", "sh", "-c",
            "md5sum /tmp/blob; cat /opt/sub/f; ln -s /etc /evil; echo mine > /made",
        )  # fmt: skip
        assert inside.stdout.split()[2:] == ["in", "a", "tree"], inside.stderr
        out = tmp_path / "out"
        out.mkdir()
        assert virtc(run_root, store, "cp", "cp1:/tmp/blob", str(out / "b")).returncode == 0
        assert (out / "b").read_bytes() == blob.read_bytes()
        assert virtc(run_root, store, "cp", "cp1:/made", str(out)).returncode == 0
        assert (out / "made").read_text() == "mine\n"
        assert virtc(run_root, store, "cp", str(blob), "cp1:/vol/v").returncode == 0
        assert (vol / "v").read_bytes() == blob.read_bytes()
        planted = virtc(run_root, store, "cp", str(blob), "cp1:/evil/vc-planted")
        assert planted.returncode == 0, planted.stderr
        assert not os.path.exists("/etc/vc-planted")
        seen = virtc(run_root, store, "exec", "cp1", "--", "ls", "/etc/vc-planted")
        assert seen.stdout.strip() == "/etc/vc-planted"
        missing = virtc(run_root, store, "cp", "cp1:/nope", str(out))
        assert missing.returncode == 2 and "/nope: no such file" in missing.stderr
    finally:
        assert virtc(run_root, store, "stop", "cp1").returncode == 0


async def test_container_process_streams(run_root: str, store: ImageStore) -> None:
    """The container's output arrives while it runs; stdin reaches it."""
    async with Sandbox(image="busybox", image_store=store.root, run_root=run_root) as sb:
        c = await sb.create_container(["sh", "-c", "echo first; read x; echo got $x; exit 3"])
        proc = await c.start()
        first = await anext(aiter(proc.stdout))
        assert first == b"first\n"  # before the container has read its stdin: streamed
        await proc.write_stdin(b"yes\n")
        await proc.close_stdin()
        assert await proc.stdout.read() == b"got yes\n"
        assert (await proc.wait()).exit_code == 3


def test_sync_container(run_root: str, store: ImageStore) -> None:
    from virtcontainers import sync

    with sync.Sandbox(image="busybox", image_store=store.root, run_root=run_root) as sb:
        c = sb.create_container(["sh", "-c", "echo hi from $(hostname)"], hostname="syncbox")
        assert c.run().stdout == b"hi from syncbox\n"


async def until_ok(c: Container, argv: list[str]) -> bytes:
    """`argv`'s output in container `c` once it succeeds with some (its first process may
    still be setting up when a detached start returns, or have created a file not yet
    written)."""
    for _ in range(200):
        result = await c.exec(argv)
        if result.exit_code == 0 and result.stdout:
            return result.stdout
        await asyncio.sleep(0.05)
    raise AssertionError(f"{argv} kept failing in {c.id}: {result}")


async def test_containers_in_one_sandbox(run_root: str, store: ImageStore) -> None:
    """Two containers from one image in one sandbox: each its own root, processes and cgroup;
    one deleted while the other runs on; a new one takes its place; nothing left after stop."""
    sb = Sandbox(image="busybox", image_store=store.root, run_root=run_root, pcie_root_port=2)
    async with sb:
        mine = "echo {0} > /mine; touch /only-{0}; exec sleep 600"
        a = await sb.create_container(["sh", "-c", mine.format("a")], id="ca")
        b = await sb.create_container(["sh", "-c", mine.format("b")], id="cb")
        with pytest.raises(ConfigError, match=f"sandbox {sb.id} already has a container 'ca'"):
            await sb.create_container(["true"], id="ca")
        with pytest.raises(ConfigError, match=f"{sb.id} has no container 'cx' to share namesp"):
            await sb.create_container(["true"], id="cc", share_with="cx")
        with pytest.raises(ConfigError, match="only pid, ipc and uts namespaces are shared, not n"):
            await sb.create_container(["true"], id="cc", share_with="ca", shared=["network"])
        with pytest.raises(StateError, match=r"has 2 containers \(ca, cb\): name one"):
            sb.container()
        assert sb.container("cb") is b
        fsd = set(sb.hypervisor.helpers.pids("virtiofsd"))  # type: ignore[attr-defined]
        assert len(fsd) == 2  # the sandbox's share, and the one hot-added for b
        for c in (a, b):
            await c.setup()
            await c.start(detach=True)
        assert await until_ok(a, ["cat", "/mine"]) == b"a\n"
        assert await until_ok(b, ["cat", "/mine"]) == b"b\n"
        # Each sees only its own files...
        assert (await a.exec(["ls", "/only-b"])).exit_code != 0
        assert (await b.exec(["ls", "/only-a"])).exit_code != 0
        # ...and its own processes: its own pid namespace and cgroup.
        pa, pb = await a.processes(), await b.processes()
        assert [cmd for _, cmd in pa] == ["sleep 600"] and [cmd for _, cmd in pb] == ["sleep 600"]
        assert pa != pb
        inside = (await a.exec(["ps", "-o", "args"])).stdout.decode().splitlines()
        assert inside[1:] == ["sleep 600", "ps -o args"], inside
        procs = await sb.exec(["cat", "/sys/fs/cgroup/vc-ca/cgroup.procs"])
        assert [int(p) for p in procs.stdout.split()] == [pid for pid, _ in pa]

        # b goes (with its share and virtiofsd); a runs on.
        await b.delete()
        assert list(sb.containers) == ["ca"]
        assert set(sb.hypervisor.helpers.pids("virtiofsd")) < fsd  # type: ignore[attr-defined]
        assert (await sb.exec(["ls", "/run/vc/c"])).stdout == b"ca\n"
        assert (await sb.exec(["ls", "/sys/fs/cgroup/vc-cb"])).exit_code != 0
        assert await a.processes() == pa
        assert (await a.exec(["cat", "/mine"])).stdout == b"a\n"
        # The id is free again: a fresh root (not b's files), on a freed hotplug port.
        again = await sb.create_container(["sh", "-c", "ls /only-b /only-a 2>&1; true"], id="cb")
        out = (await again.run()).stdout.decode()
        assert "only-b: No such file" in out and "only-a: No such file" in out, out
    assert not processes_mentioning(run_root)


async def test_cli_names_one_of_several_containers(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    """`virtc exec/ps/cp --container` reach the container named among several; without it
    they say which there are."""
    sb = Sandbox(image="busybox", image_store=store.root, run_root=run_root, pcie_root_port=1)
    await sb.start()
    try:
        for cid in ("ca", "cb"):
            c = await sb.create_container(
                ["sh", "-c", f"echo {cid} > /mine; exec sleep 600"], id=cid
            )
            await c.setup()
            await c.start(detach=True)
            assert await until_ok(c, ["cat", "/mine"]) == f"{cid}\n".encode()
        await sb.detach()

        def cli(*args: str) -> str:
            done = virtc(run_root, store, *args)
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert cli("exec", "--container", "cb", sb.id, "--", "cat", "/mine") == "cb\n"
        assert cli("exec", "-c", "ca", sb.id, "--", "cat", "/mine") == "ca\n"
        assert "sleep 600" in cli("ps", "-c", "cb", sb.id)
        cli("cp", "-c", "cb", f"{sb.id}:/mine", str(tmp_path / "b.txt"))
        assert (tmp_path / "b.txt").read_text() == "cb\n"
        (tmp_path / "in.txt").write_text("to a\n")
        cli("cp", "-c", "ca", str(tmp_path / "in.txt"), f"{sb.id}:/in.txt")
        assert cli("exec", "-c", "ca", sb.id, "--", "cat", "/in.txt") == "to a\n"
        assert virtc(run_root, store, "exec", "-c", "cb", sb.id, "--", "ls", "/in.txt").returncode
        for args in (("exec", sb.id, "--", "true"), ("ps", sb.id)):
            done = virtc(run_root, store, *args)
            assert done.returncode != 0 and "has 2 containers (ca, cb): name one" in done.stderr
        done = virtc(run_root, store, "exec", "-c", "nope", sb.id, "--", "true")
        assert done.returncode != 0 and "nope" in done.stderr, done.stderr
    finally:
        await sb.stop()  # this process is the VMM's parent: it reaps
    assert not processes_mentioning(run_root)


def test_sync_containers_in_one_sandbox(run_root: str, store: ImageStore) -> None:
    from virtcontainers import sync

    with sync.Sandbox(
        image="busybox", image_store=store.root, run_root=run_root, pcie_root_port=1
    ) as sb:
        one = sb.create_container(["sh", "-c", "echo one > /f; cat /f"])
        two = sb.create_container(["sh", "-c", "cat /f 2>&1; echo two"], id="two")
        assert one.run().stdout == b"one\n"
        assert two.run().stdout.endswith(b"No such file or directory\ntwo\n")
        # No hotplug port left for a third: refused by name, its root share undone.
        with pytest.raises(HypervisorError, match="no free pcie-root-port for fs-ctr2"):
            sb.create_container(["true"], id="three")
        assert sorted(sb.aio.containers) == sorted([sb.id, "two"])
        assert not os.path.exists(os.path.join(persist.vm_dir(sb.id, run_root), "ctr2"))
        assert sb.container("two").id == "two"
        two.delete()
        assert list(sb.aio.containers) == [sb.id]


def write_bundle(store: ImageStore, path: Path, script: str, mounts: list[object]) -> str:
    """An OCI bundle of the busybox image running `script`, with `mounts`."""
    path.mkdir()
    shutil.copytree(store.rootfs(store.get("busybox")), path / "rootfs", symlinks=True)
    config = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "mounts": mounts,
    }
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


async def test_bundles_with_file_binds_in_one_sandbox(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    """Files bound by a bundle's config.json (as CRI binds /etc/hosts and /etc/resolv.conf)
    reach the container read-write or read-only, their siblings do not; a second bundle's
    container, hot-added to the running sandbox, gets its own root and binds."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "hosts").write_text("10.0.0.1 pod\n")
    (files / "resolv.conf").write_text("nameserver 10.0.0.53\n")
    (files / "secret").write_text("not for the container\n")
    bind = lambda name, dest, *o: {  # noqa: E731
        "destination": dest, "type": "bind", "source": str(files / name),
        "options": ["rbind", *o],
    }  # fmt: skip
    first = write_bundle(
        store,
        tmp_path / "first",
        "cat /etc/hosts /etc/resolv.conf; echo 10.0.0.2 me >> /etc/hosts; "
        "echo x >> /etc/resolv.conf || echo read-only; ls /etc/secret 2>&1; echo first > /mine",
        [bind("hosts", "/etc/hosts", "rw"), bind("resolv.conf", "/etc/resolv.conf", "ro")],
    )
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "log").write_text("")
    second = write_bundle(
        store, tmp_path / "second", "cat /etc/resolv.conf; cat /mine 2>&1; echo 2nd > /log",
        [bind("resolv.conf", "/etc/resolv.conf", "ro"),  # the sandbox's share, reused
         bind("../more/log", "/log", "rw")],  # a share hot-added for this container
    )  # fmt: skip
    sb = Sandbox(bundle=first, run_root=run_root, pcie_root_port=2)
    async with sb:
        one = (await (await sb.create_container()).run()).stdout.decode().splitlines()
        assert one[:2] == ["10.0.0.1 pod", "nameserver 10.0.0.53"]
        assert "read-only" in one and "No such file" in one[-1], one
        assert (files / "hosts").read_text() == "10.0.0.1 pod\n10.0.0.2 me\n"
        assert (files / "resolv.conf").read_text() == "nameserver 10.0.0.53\n"
        two = await sb.create_container(bundle=second, id="second")
        out = (await two.run()).stdout.decode().splitlines()
        assert out[0] == "nameserver 10.0.0.53" and "No such file" in out[1], out
        assert (tmp_path / "more" / "log").read_text() == "2nd\n"
        assert len(two.record.hot_shares) == 2  # its root and the log's directory
        await two.delete()
    assert (tmp_path / "first" / "rootfs" / "mine").read_text() == "first\n"
    assert not (tmp_path / "second" / "rootfs" / "mine").exists()


async def test_cp_into_a_userns_container_belongs_to_its_root(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    """As docker cp does: a file copied into a container of `userns="auto"` belongs to the
    container's root (host id 100000), so that root can change it; copied out, it belongs
    to the user copying."""
    conf = tmp_path / "app.conf"
    conf.write_text("one\n")
    os.chown(conf, 4321, 4321)
    sb = Sandbox(image="busybox", image_store=store.root, run_root=run_root, userns="auto")
    async with sb:
        c = await sb.create_container(["sleep", "600"])
        await c.start(detach=True)
        await c.copy_in(str(conf), "/etc/app.conf")
        inside = await c.exec(
            ["sh", "-c", "stat -c %u:%g /etc/app.conf; echo two >> /etc/app.conf"]
        )
        await c.copy_out("/etc/app.conf", str(tmp_path / "back.conf"))
        await c.kill(9)
        await c.wait()
    assert (inside.exit_code, inside.stdout.decode()) == (0, "0:0\n"), inside
    back = (tmp_path / "back.conf").stat()
    assert (back.st_uid, back.st_gid) == (os.getuid(), os.getgid())
    assert (tmp_path / "back.conf").read_text() == "one\ntwo\n"


def test_a_shifted_layer_is_made_once_and_goes_with_its_image(tmp_path: Path) -> None:
    """The store's layer of shifted owners: one per image and shift, made in a mount
    namespace of its own (nothing stays mounted), removed with the image."""
    store = ImageStore(str(tmp_path / "store"))
    image = store.import_archive(busybox_image())[0]
    layer = store.shifted_rootfs(image, 200000)
    assert store.shifted_rootfs(image, 200000) == layer
    assert os.lstat(os.path.join(layer, "etc", "passwd")).st_uid == 200000
    other = store.shifted_rootfs(image, 300000)
    assert other != layer and os.lstat(other).st_uid == 300000
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    assert os.listdir(tmp_path / "store" / "tmp") == []
    store.remove("busybox")
    assert os.listdir(tmp_path / "store" / "rootfs") == []
