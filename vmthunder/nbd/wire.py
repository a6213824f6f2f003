"""Binary layouts of the NBD wire messages, shared by client and server.

Every NBD field is big-endian. Each :class:`struct.Struct` below is one
fixed-size message (or the fixed head of one) from the protocol document
(doc/proto.md of the NBD project); the comment names its fields in
order. Magics and other values are in :mod:`vmthunder.nbd.constants`.

A module that packs or parses these per request binds the ones it uses
there as its own globals (``REQUEST = wire.REQUEST``) instead of importing
them by name: CPython 3.11 compiles ``NAME.pack(...)`` on a name bound by
an import without LOAD_METHOD, making a bound method at every call (a
third slower for a reply header).
"""

import struct

# -- handshake ----------------------------------------------------------

# Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
GREETING = struct.Struct(">QQH")
# Option request (client -> server): IHAVEOPT, option, payload length;
# the payload follows.
OPT_HEADER = struct.Struct(">QII")
# Option reply (server -> client): OPT_REPLY_MAGIC, option, reply type,
# payload length; the payload follows.
OPT_REPLY = struct.Struct(">QIII")
# Answer to NBD_OPT_EXPORT_NAME: export size, transmission flags; then
# EXPORT_NAME_PADDING zero bytes unless NO_ZEROES was agreed.
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124
# NBD_REP_INFO payloads: info type, then its fields.
INFO_EXPORT = struct.Struct(">HQH")          # type, size, flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")     # type, minimum, preferred,
#                                              maximum

# -- transmission -------------------------------------------------------

# Request: REQUEST_MAGIC, command flags, command, handle, offset, length;
# NBD_CMD_WRITE's data follows.
REQUEST = struct.Struct(">IHHQQI")
# Simple reply: SIMPLE_REPLY_MAGIC, error, handle; read data follows.
SIMPLE_REPLY = struct.Struct(">IIQ")
# Head of one structured reply chunk: STRUCTURED_REPLY_MAGIC, reply
# flags, chunk type, handle, payload length; the payload follows.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# Chunk payloads. NBD_REPLY_TYPE_OFFSET_DATA starts with a U64 offset,
# then the data; NBD_REPLY_TYPE_BLOCK_STATUS with a U32 context id, then
# one BLOCK_DESCRIPTOR per extent.
OFFSET_HOLE = struct.Struct(">QI")           # offset, hole length
BLOCK_DESCRIPTOR = struct.Struct(">II")      # extent length, flags
# Head of an error chunk: error, message length; the message follows
# (and NBD_REPLY_TYPE_ERROR_OFFSET ends with a U64 offset).
ERROR_HEAD = struct.Struct(">IH")

# -- fields -------------------------------------------------------------

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
