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


def _parse_port(text: str, where: str, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not text.isdigit() or not low <= int(text) < 65536:
        raise ValueError(f"bad port {text!r} in {where!r}: expected a "
                         f"number from {low} to 65535"
                         + (" (0 picks a free port)" if allow_zero else ""))
    return int(text)


def listen_address_arg(text: str) -> Address:
    """argparse type for --listen style options."""
    import argparse
    try:
        return parse_address(text, listen=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_address(address, *, listen: bool = False) -> Address:
    """Parse ``tcp:HOST:PORT`` (``tcp:[IPV6]:PORT``) or ``unix:PATH``.

    ``listen`` allows port 0 (the kernel picks a free one). ValueError
    says what is wrong.
    """
    if isinstance(address, Address):
        return address
    if not isinstance(address, str):
        raise TypeError(f"NBD address must be a str, got "
                        f"{type(address).__name__}")
    kind, sep, rest = address.partition(":")
    if sep and kind == "unix":
        if not rest:
            raise ValueError(f"NBD address {address!r} has no socket path "
                             f"(expected 'unix:PATH')")
        return Address("unix", path=rest)
    if sep and kind == "tcp":
        if rest.startswith("["):
            host, bracket, port = rest[1:].partition("]")
            if not bracket or not port.startswith(":"):
                raise ValueError(
                    f"NBD address {address!r}: expected 'tcp:[IPV6]:PORT'")
            port = port[1:]
        else:
            host, colon, port = rest.rpartition(":")
            if not colon or ":" in host:
                raise ValueError(
                    f"NBD address {address!r}: expected 'tcp:HOST:PORT' "
                    f"(write an IPv6 host in brackets)")
        if not host:
            raise ValueError(f"NBD address {address!r} has no host")
        return Address("tcp", host=host,
                       port=_parse_port(port, address, listen))
    raise ValueError(
        f"bad NBD address {address!r}: expected 'tcp:HOST:PORT' or "
        f"'unix:PATH'")
