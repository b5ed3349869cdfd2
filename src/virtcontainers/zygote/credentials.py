"""Give a worker its client's standing: the same privileges (capabilities, no_new_privs,
seccomp, LSM label: checked equal, a client with less is refused, so the zygote never
lends it what it lacks) and the client's own group ids, resource limits, nice value and OOM
score (adopted, as a command run by the client itself would inherit them)."""

from __future__ import annotations

import os
import resource

from .namespaces import Refused

EQUAL_STATUS = (
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
)
"""/proc/<pid>/status fields a worker cannot take on after the fact, so they must match."""
LIMITS = tuple(
    getattr(resource, name) for name in sorted(dir(resource)) if name.startswith("RLIMIT_")
)


def _status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _label(pid: int | str) -> str | None:
    """The process's LSM label (None where no LSM gives one)."""
    try:
        with open(f"/proc/{pid}/attr/current", "rb") as f:
            return f.read().rstrip(b"\0\n").decode("utf-8", "replace")
    except OSError:
        return None


def take_on(pid: int) -> None:
    """Check `pid` has this process's privileges, then adopt its ids and limits
    (`Refused` when either cannot be); its status is read once for both."""
    try:
        theirs = _status(pid)
    except OSError as exc:
        raise Refused(f"cannot read client pid {pid}'s status: {exc}") from exc
    check_privileges(pid, theirs)
    adopt(pid, theirs)


def check_privileges(pid: int, theirs: dict[str, str]) -> None:
    """`Refused` unless `pid` (whose /proc status is `theirs`) has exactly this process's
    privileges."""
    ours = _status("self")
    for field in EQUAL_STATUS:
        if theirs.get(field) != ours.get(field):
            raise Refused(
                f"client pid {pid} has {field} {theirs.get(field)}, the zygote "
                f"{ours.get(field)} (a worker would not have the client's privileges)"
            )
    if _label(pid) != _label("self"):
        raise Refused(f"client pid {pid} has another security label ({_label(pid)})")


def adopt(pid: int, status: dict[str, str]) -> None:
    """Take on `pid`'s (its /proc status: `status`) group ids, resource limits, nice value
    and OOM score adjustment; `Refused` when one cannot be (raising a hard limit needs
    CAP_SYS_RESOURCE)."""
    try:
        gids = [int(g) for g in status["Gid"].split()[:3]]
        groups = [int(g) for g in status.get("Groups", "").split()]
        if groups != sorted(os.getgroups()):
            os.setgroups(groups)
        if list(os.getresgid()) != gids:
            os.setresgid(*gids)
        for limit in LIMITS:
            wanted = resource.prlimit(pid, limit)
            if resource.getrlimit(limit) != wanted:
                resource.setrlimit(limit, wanted)
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        with open(f"/proc/{pid}/oom_score_adj", encoding="ascii") as f:
            score = f.read().strip()
        with open("/proc/self/oom_score_adj", "r+", encoding="ascii") as f:
            if f.read().strip() != score:
                f.seek(0)
                f.write(score)
    except (OSError, ValueError, KeyError) as exc:
        raise Refused(f"cannot take on client pid {pid}'s ids and limits: {exc}") from exc
