"""The zygote: a resident process with the whole library imported that forks a worker per
`virtc` or `containerd-shim-virtc-v2` command, so a command does not pay for an interpreter's
imports (the Android/Chromium model). The VM cache server starts and stops it.

`client` (imported by the entry points: standard library only) hands a command over to it;
`protocol` is the wire format; `server` accepts and forks; `worker` becomes the command;
`preload` imports what workers use; `control` starts and stops it beside the VM cache server.
"""
