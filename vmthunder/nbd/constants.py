"""Wire constants of the NBD protocol (doc/proto.md of the NBD project).

Names follow the protocol document without the ``NBD_`` prefix so that a
reader can grep the spec for them.
"""

# Meta contexts and their flags: the layers answer block_status() in the
# NBD values, so these are defined once, with the layer interface:
# base:allocation's STATE_HOLE and STATE_ZERO; in our own vmthunder:cache,
# a chunk present in a vmthunder cache has STATE_CACHED set.
from vmthunder.blockdev import (  # noqa: F401  (re-exported)
    BASE_ALLOCATION, STATE_CACHED, STATE_HOLE, STATE_ZERO, VMTHUNDER_CACHE)

# Handshake (fixed newstyle).
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
# Magic an oldstyle server sends instead of IHAVEOPT (not supported here).
OLDSTYLE_MAGIC = 0x00420281861253

# Handshake flags (server -> client), client flags (client -> server).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = 1 | REP_FLAG_ERROR
REP_ERR_POLICY = 2 | REP_FLAG_ERROR
REP_ERR_INVALID = 3 | REP_FLAG_ERROR
REP_ERR_PLATFORM = 4 | REP_FLAG_ERROR
REP_ERR_TLS_REQD = 5 | REP_FLAG_ERROR
REP_ERR_UNKNOWN = 6 | REP_FLAG_ERROR
REP_ERR_SHUTDOWN = 7 | REP_FLAG_ERROR
REP_ERR_BLOCK_SIZE_REQD = 8 | REP_FLAG_ERROR
REP_ERR_TOO_BIG = 9 | REP_FLAG_ERROR

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Requests.
REQUEST_MAGIC = 0x25609513
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Replies.
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_FLAG_ERROR = 1 << 15
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# Error values on the wire (Linux errno numbers, as the spec fixes them).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# Limits the spec names: strings in options are at most 4096 bytes.
MAX_STRING = 4096

# Block size defaults the spec gives when a server advertises none: any
# alignment, 4 KiB preferred, and 32 MiB as the largest read/write payload
# a client can count on.
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
