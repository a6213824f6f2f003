"""Listen/connect addresses: ``tcp:HOST:PORT`` or ``unix:PATH``."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Address:
    kind: str            # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def nbd_uri(self, export: str = "") -> str:
        """The URI QEMU and libnbd tools take for this address."""
        if self.kind == "unix":
            return f"nbd+unix:///{export}?socket={self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"


def parse_address(text: str) -> Address:
    """Parse ``tcp:HOST:PORT`` or ``unix:PATH``; ValueError says why not."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("tcp", "unix") or not rest:
        raise ValueError(
            f"address {text!r} is not tcp:HOST:PORT or unix:PATH")
    if kind == "unix":
        return Address("unix", path=rest)
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) \
            < 65536:
        raise ValueError(
            f"address {text!r} is not tcp:HOST:PORT (PORT 0-65535; 0 "
            "picks a free port)")
    return Address("tcp", host=host, port=int(port))
