"""The agent's persistent state: which images are attached, which VMs exist.

One JSON file, ``<state_dir>/state.json``, rewritten atomically (temporary
file, fsync, rename, fsync of the directory) after every change, so a
crash leaves either the old or the new state, never a torn one::

    {"version": 1,
     "images": [{"name": "debian", "origin": "export:debian"},
                {"name": "centos", "origin": "export:centos",
                 "pinned": true, "cache_dir": "/var/lib/vmthunder/cache/KEY"}],
     "vms": [{"name": "vm1", "image": "debian"},
             {"name": "vm2", "image": "debian", "size": 21474836480}]}

Only names, origins, whether an image is pinned (never evicted from the
cache: agent/capacity.py; recorded only when it is), an image's cache
directory once attached (so a pin holds while its origin is down after a
restart) and a VM's disk size
(its snapshot's virtual size in bytes, recorded only when one was asked
for; none means the image's size) are stored: the data lives in the
cache and snapshot directories, which the layers find again by
themselves.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os

VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = "lock"


class StateError(Exception):
    pass


def empty() -> dict:
    return {"version": VERSION, "images": [], "vms": []}


class StateStore:
    def __init__(self, state_dir: str):
        self.directory = os.path.abspath(state_dir)
        self.path = os.path.join(self.directory, STATE_FILE)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Hold the directory for this process: one agent per state."""
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        fd = os.open(os.path.join(self.directory, LOCK_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(
                f"state directory {self.directory} is in use by another "
                "vmthunder-agent; stop it first, or give this one its own "
                "--state-dir") from None
        self._lock_fd = fd

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> dict:
        try:
            with open(self.path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return empty()
        except (OSError, ValueError) as exc:
            raise StateError(
                f"cannot read the agent state {self.path}: {exc}; fix or "
                "move the file away (the agent then starts with no images "
                "and no VMs)") from None
        if not isinstance(state, dict) or state.get("version") != VERSION:
            raise StateError(
                f"{self.path} is not a version {VERSION} agent state file; "
                "move it away to start afresh")
        for key, fields in (("images", ("name", "origin")),
                            ("vms", ("name", "image"))):
            entries = state.get(key, [])
            if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and all(
                        isinstance(e.get(f), str) for f in fields)
                    for e in entries):
                raise StateError(
                    f"{self.path}: {key!r} must be a list of objects with "
                    f"string fields {', '.join(fields)}; fix or move the "
                    "file away")
            # A VM's optional disk size, in bytes; an image's pin.
            optional = ("size",) if key == "vms" else ("pinned",
                                                       "cache_dir")
            for e in entries:
                for f in optional:
                    if f == "pinned" and f in e \
                            and not isinstance(e[f], bool):
                        raise StateError(
                            f"{self.path}: image {e['name']!r}: 'pinned' "
                            f"must be true or false, not {e[f]!r}; fix or "
                            "move the file away")
                    if f == "cache_dir" and f in e and not (
                            isinstance(e[f], str) and os.path.isabs(e[f])):
                        raise StateError(
                            f"{self.path}: image {e['name']!r}: "
                            f"'cache_dir' must be an absolute path, not "
                            f"{e[f]!r}; fix or move the file away")
                    if f == "size" and f in e and (
                            isinstance(e[f], bool)
                            or not isinstance(e[f], int) or e[f] <= 0):
                        raise StateError(
                            f"{self.path}: {key[:-1]} {e['name']!r}: "
                            f"{f!r} must be a positive integer, not "
                            f"{e[f]!r}; fix or move the file away")
            state[key] = [{f: e[f] for f in fields + optional if f in e}
                          for e in entries]
        return state

    def save(self, images: list[dict], vms: list[dict]) -> None:
        state = {"version": VERSION, "images": images, "vms": vms}
        data = json.dumps(state, indent=1, sort_keys=True) + "\n"
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(data.encode())
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        except OSError as exc:         # some filesystems refuse: not fatal
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(dfd)
