"""A ctypes binding of libiscsi's asynchronous API (only what vmthunder uses).

libiscsi (the C initiator library QEMU uses; Debian ``libiscsi7``) does the
iSCSI protocol: login with CHAP, PDU framing, digests, sequence numbers.
Nothing here blocks or uses a thread: the caller owns the event loop.
It watches :meth:`Context.fd` for :meth:`Context.which_events`, calls
:meth:`Context.service` when the fd is ready, and looks at the fd and the
events again after every call (both change when a connection is replaced).
Completions arrive as calls of the Python callables given to the
``*_async``/``*_task`` methods, from inside :meth:`Context.service` (or
:meth:`Context.destroy`, which completes everything still in flight with
:data:`STATUS_CANCELLED`).

Reads go straight into caller-owned memory (``iscsi_read16_iov_task``):
libiscsi receives DATA-IN payloads into the buffer with no copy. The
buffer must stay alive, untouched, until the command's callback has run.

Struct layouts were checked against /usr/include/iscsi/scsi-lowlevel.h of
libiscsi 1.19 on x86_64 (``struct scsi_task`` is 176 bytes; the functional
tests compile a small C program and compare every offset used here).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import itertools
import logging
import select

LOG = logging.getLogger(__name__)

SONAME = "libiscsi.so.7"

# Event bits iscsi_which_events() returns and iscsi_service() takes.
POLLIN = select.POLLIN
POLLOUT = select.POLLOUT
POLLERR = select.POLLERR
POLLHUP = select.POLLHUP

# enum iscsi_session_type
SESSION_NORMAL = 2
# enum iscsi_header_digest
HEADER_DIGESTS = {"none": 0, "none-crc32c": 1, "crc32c-none": 2,
                  "crc32c": 3}

# enum scsi_status
STATUS_GOOD = 0
STATUS_CHECK_CONDITION = 2
STATUS_CONDITION_MET = 4
STATUS_BUSY = 8
STATUS_RESERVATION_CONFLICT = 0x18
STATUS_TASK_SET_FULL = 0x28
STATUS_TASK_ABORTED = 0x40
STATUS_REDIRECT = 0x101
STATUS_CANCELLED = 0x0f000000
STATUS_ERROR = 0x0f000001
STATUS_TIMEOUT = 0x0f000002

STATUS_NAMES = {
    STATUS_GOOD: "GOOD", STATUS_CHECK_CONDITION: "CHECK CONDITION",
    STATUS_CONDITION_MET: "CONDITION MET", STATUS_BUSY: "BUSY",
    STATUS_RESERVATION_CONFLICT: "RESERVATION CONFLICT",
    STATUS_TASK_SET_FULL: "TASK SET FULL",
    STATUS_TASK_ABORTED: "TASK ABORTED", STATUS_REDIRECT: "REDIRECT",
    STATUS_CANCELLED: "CANCELLED", STATUS_ERROR: "ERROR",
    STATUS_TIMEOUT: "TIMEOUT",
}

# enum scsi_sense_key (the ones callers act on)
SENSE_UNIT_ATTENTION = 6

# enum scsi_residual
RESIDUAL_NONE = 0
RESIDUAL_UNDERFLOW = 1
RESIDUAL_OVERFLOW = 2


class LibiscsiError(OSError):
    """libiscsi is missing, or a call failed before anything was queued."""


# -- structures (scsi-lowlevel.h) --------------------------------------

class ScsiIovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class ScsiSense(ctypes.Structure):
    _fields_ = [("error_type", ctypes.c_ubyte),
                ("key", ctypes.c_int),
                ("ascq", ctypes.c_int),
                # sense_specific/ill_param_in_cdb/bit_pointer_valid bit
                # fields, bit_pointer, field_pointer: not used here.
                ("_specific", ctypes.c_ubyte * 4)]


class ScsiData(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int),
                ("data", ctypes.POINTER(ctypes.c_ubyte))]


class ScsiIovector(ctypes.Structure):
    _fields_ = [("iov", ctypes.POINTER(ScsiIovec)),
                ("niov", ctypes.c_int),
                ("nalloc", ctypes.c_int),
                ("offset", ctypes.c_size_t),
                ("consumed", ctypes.c_int)]


class ScsiTask(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int),
                ("cdb_size", ctypes.c_int),
                ("xfer_dir", ctypes.c_int),
                ("expxferlen", ctypes.c_int),
                ("cdb", ctypes.c_ubyte * 16),
                ("residual_status", ctypes.c_int),
                ("residual", ctypes.c_size_t),
                ("sense", ScsiSense),
                ("datain", ScsiData),
                ("mem", ctypes.c_void_p),
                ("ptr", ctypes.c_void_p),
                ("itt", ctypes.c_uint32),
                ("cmdsn", ctypes.c_uint32),
                ("lun", ctypes.c_uint32),
                ("iovector_in", ScsiIovector),
                ("iovector_out", ScsiIovector)]


# void (*iscsi_command_cb)(struct iscsi_context *, int status,
#                          void *command_data, void *private_data)
COMMAND_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_void_p, ctypes.c_void_p)

# void (*iscsi_log_fn)(int level, const char *message)
LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p)

_P = ctypes.c_void_p
_I = ctypes.c_int
_S = ctypes.c_char_p
_U32 = ctypes.c_uint32
_U64 = ctypes.c_uint64

_PROTOTYPES = {
    # name: (restype, argtypes)
    "iscsi_create_context": (_P, [_S]),
    "iscsi_destroy_context": (_I, [_P]),
    "iscsi_set_targetname": (_I, [_P, _S]),
    "iscsi_set_session_type": (_I, [_P, _I]),
    "iscsi_set_header_digest": (_I, [_P, _I]),
    "iscsi_set_initiator_username_pwd": (_I, [_P, _S, _S]),
    "iscsi_set_noautoreconnect": (None, [_P, _I]),
    "iscsi_set_timeout": (_I, [_P, _I]),
    "iscsi_set_log_level": (None, [_P, _I]),
    "iscsi_set_log_fn": (None, [_P, LOG_FN]),
    "iscsi_full_connect_async": (_I, [_P, _S, _I, COMMAND_CB, _P]),
    "iscsi_logout_async": (_I, [_P, COMMAND_CB, _P]),
    "iscsi_disconnect": (_I, [_P]),
    "iscsi_is_logged_in": (_I, [_P]),
    "iscsi_get_fd": (_I, [_P]),
    "iscsi_which_events": (_I, [_P]),
    "iscsi_service": (_I, [_P, _I]),
    "iscsi_queue_length": (_I, [_P]),
    "iscsi_get_error": (_S, [_P]),
    "iscsi_readcapacity16_task": (_P, [_P, _I, COMMAND_CB, _P]),
    "iscsi_read16_iov_task": (_P, [_P, _I, _U64, _U32, _I, _I, _I, _I, _I,
                                   _I, COMMAND_CB, _P,
                                   ctypes.POINTER(ScsiIovec), _I]),
    "scsi_free_scsi_task": (None, [_P]),
    "scsi_sense_key_str": (_S, [_I]),
    "scsi_sense_ascq_str": (_S, [_I]),
}

_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The library with prototypes set; LibiscsiError if not installed."""
    global _lib
    if _lib is not None:
        return _lib
    names = [SONAME]
    found = ctypes.util.find_library("iscsi")
    if found and found not in names:
        names.append(found)
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as exc:
            errors.append(str(exc))
    else:
        raise LibiscsiError(
            f"libiscsi is not installed ({'; '.join(errors)}); install "
            "the libiscsi7 package (Debian/Ubuntu) or libiscsi (Fedora)")
    for name, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise LibiscsiError(f"{SONAME} has no {name}(): libiscsi is "
                                "too old (1.19 or newer works)") from None
        fn.restype = restype
        fn.argtypes = argtypes
    _lib = lib
    return lib


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, f"status {status:#x}")


def sense_text(key: int, ascq: int) -> str:
    lib = load()
    k = lib.scsi_sense_key_str(key) or b"?"
    a = lib.scsi_sense_ascq_str(ascq) or b"?"
    return (f"sense key {k.decode(errors='replace')} ({key:#x}), "
            f"ASC/ASCQ {a.decode(errors='replace')} ({ascq:#06x})")


def task_struct(task: int) -> ScsiTask:
    """A view of ``struct scsi_task`` at address ``task`` (no copy)."""
    return ScsiTask.from_address(task)


# -- callbacks ---------------------------------------------------------
#
# libiscsi calls one C trampoline for every completion; its private_data
# is a key into this table of Python callables. The CFUNCTYPE object is
# module-global, so it can never be collected while C holds it.

_handlers: dict[int, object] = {}
_keys = itertools.count(1)


def _dispatch(_ctx, status, command_data, private_data):
    handler = _handlers.pop(private_data or 0, None)
    if handler is None:
        # Never expected; a task must still be freed to avoid a leak.
        LOG.error("libiscsi completion with unknown key %r", private_data)
        return
    try:
        handler(status, command_data or 0)
    except BaseException:       # an exception must not unwind through C
        LOG.exception("libiscsi completion handler failed")


_TRAMPOLINE = COMMAND_CB(_dispatch)


def _register(handler) -> int:
    key = next(_keys)
    _handlers[key] = handler
    return key


class Context:
    """One ``struct iscsi_context``: one session on one connection.

    Owns the context pointer; :meth:`destroy` frees it (idempotent). A
    context is never reused after its connection fails: the caller
    destroys it and creates a new one (libiscsi's own reconnect is
    switched off, see :meth:`__init__`).
    """

    def __init__(self, initiator_name: str, target_name: str, *,
                 header_digest: str = "none-crc32c",
                 username: str | None = None,
                 password: str | None = None):
        self._lib = load()
        self._keys: set[int] = set()
        # libiscsi's error messages, newest last (see errors_since()).
        self.log_count = 0
        self._messages: collections.deque = collections.deque(maxlen=16)
        ptr = self._lib.iscsi_create_context(initiator_name.encode())
        if not ptr:
            raise LibiscsiError("iscsi_create_context failed (out of "
                                "memory, or a bad initiator name "
                                f"{initiator_name!r})")
        self._ptr = ptr
        self._log_cb = LOG_FN(self._logged)
        self._lib.iscsi_set_log_fn(ptr, self._log_cb)
        self._lib.iscsi_set_log_level(ptr, 1)       # errors only
        try:
            digest = HEADER_DIGESTS[header_digest]
        except KeyError:
            self.destroy()
            raise ValueError(f"bad header digest {header_digest!r}: one of "
                             f"{', '.join(HEADER_DIGESTS)}") from None
        self._check(self._lib.iscsi_set_targetname(
            ptr, target_name.encode()), "iscsi_set_targetname")
        self._check(self._lib.iscsi_set_session_type(ptr, SESSION_NORMAL),
                    "iscsi_set_session_type")
        self._check(self._lib.iscsi_set_header_digest(ptr, digest),
                    "iscsi_set_header_digest")
        if username:
            self._check(self._lib.iscsi_set_initiator_username_pwd(
                ptr, username.encode(), (password or "").encode()),
                "iscsi_set_initiator_username_pwd")
        # libiscsi's automatic reconnect retries one portal with back-off
        # of whole seconds; the caller reconnects itself (several portals,
        # its own deadline). With this set, a dropped session completes
        # every command in flight with STATUS_CANCELLED and the next
        # iscsi_service() call on the dead socket returns -1.
        self._lib.iscsi_set_noautoreconnect(ptr, 1)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = self.error()
            self.destroy()
            raise LibiscsiError(f"{what} failed: {err}")

    @property
    def alive(self) -> bool:
        return self._ptr is not None

    def _logged(self, level: int, message: bytes | None) -> None:
        try:
            text = (message or b"").decode(errors="replace").strip()
            # libiscsi appends " [TARGET]" to every message.
            if text.endswith("]") and " [" in text:
                text = text[:text.rindex(" [")].strip()
            self.log_count += 1
            self._messages.append((self.log_count, text))
            LOG.debug("libiscsi: %s", text)
        except BaseException:       # must not unwind through C
            pass

    def error(self) -> str:
        """The last error libiscsi set (may be stale: see errors_since)."""
        if self._ptr is None:
            return "context destroyed"
        msg = self._lib.iscsi_get_error(self._ptr)
        text = msg.decode(errors="replace").strip() if msg else ""
        if _is_noise(text):
            later = self.errors_since(0)
            return later[-1] if later else ""
        return text

    def errors_since(self, count: int) -> list[str]:
        """Error messages logged after ``log_count`` was ``count``.

        When a session breaks, libiscsi overwrites the real cause
        ("read from socket failed", "Invalid data size received") with
        a message about its own (disabled) reconnect logic; the log
        keeps the cause.
        """
        return [text for seq, text in self._messages
                if seq > count and not _is_noise(text)]

    def _submit_key(self, handler) -> int:
        key = _register(handler)
        self._keys.add(key)
        return key

    def _done_key(self, key: int) -> None:
        self._keys.discard(key)
        _handlers.pop(key, None)

    def _wrap(self, handler):
        """Forget the key once the completion arrives."""
        holder = {}

        def done(status, data):
            self._keys.discard(holder["key"])
            handler(status, data)
        holder["key"] = self._submit_key(done)
        return holder["key"]

    # -- connection ----------------------------------------------------

    def full_connect_async(self, portal: str, lun: int, handler) -> None:
        """Connect, log in, TEST UNIT READY ``lun``; then ``handler(status,
        0)`` runs once (STATUS_GOOD or STATUS_ERROR, see :meth:`error`)."""
        key = self._wrap(handler)
        rc = self._lib.iscsi_full_connect_async(
            self._ptr, portal.encode(), lun, _TRAMPOLINE, key)
        if rc != 0:
            self._done_key(key)
            raise LibiscsiError(f"cannot start connecting to {portal}: "
                                f"{self.error()}")

    def logout_async(self, handler) -> None:
        key = self._wrap(handler)
        if self._lib.iscsi_logout_async(self._ptr, _TRAMPOLINE, key) != 0:
            self._done_key(key)
            raise LibiscsiError(f"logout failed: {self.error()}")

    def set_timeout(self, seconds: int) -> None:
        """Commands (and PDUs) queued from now on complete with
        STATUS_TIMEOUT after ``seconds`` (0: never); libiscsi checks only
        when service() is called, so call it now and then."""
        self._lib.iscsi_set_timeout(self._ptr, int(seconds))

    def is_logged_in(self) -> bool:
        return bool(self._ptr) and bool(
            self._lib.iscsi_is_logged_in(self._ptr))

    # -- event loop integration -------------------------------------------

    def fd(self) -> int:
        return self._lib.iscsi_get_fd(self._ptr)

    def which_events(self) -> int:
        return self._lib.iscsi_which_events(self._ptr)

    def service(self, revents: int) -> int:
        """Process ``revents``; runs completions; < 0 when the session is
        broken beyond what libiscsi can handle (see :meth:`error`)."""
        return self._lib.iscsi_service(self._ptr, revents)

    def queue_length(self) -> int:
        return self._lib.iscsi_queue_length(self._ptr)

    # -- SCSI commands ---------------------------------------------------

    def readcapacity16(self, lun: int, handler) -> None:
        """``handler(status, task)``; the handler frees the task."""
        key = self._wrap(handler)
        task = self._lib.iscsi_readcapacity16_task(self._ptr, lun,
                                                   _TRAMPOLINE, key)
        if not task:
            self._done_key(key)
            raise LibiscsiError(f"READ CAPACITY(16) not queued: "
                                f"{self.error()}")

    def read16_into(self, lun: int, lba: int, nbytes: int, block_size: int,
                    iov: ctypes.Array, handler) -> int:
        """READ(16) of ``nbytes`` at ``lba`` straight into ``iov``.

        ``iov`` (a ``ScsiIovec`` array) and the memory it points to must
        stay alive until ``handler(status, task)`` has run; the handler
        frees the task. Returns the task address.
        """
        key = self._wrap(handler)
        task = self._lib.iscsi_read16_iov_task(
            self._ptr, lun, lba, nbytes, block_size, 0, 0, 0, 0, 0,
            _TRAMPOLINE, key, iov, len(iov))
        if not task:
            self._done_key(key)
            raise LibiscsiError(f"READ(16) not queued: {self.error()}")
        return task

    @staticmethod
    def free_task(task: int) -> None:
        if task:
            load().scsi_free_scsi_task(task)

    def destroy(self) -> None:
        """Tear the session down. Commands in flight complete (from inside
        this call) with STATUS_CANCELLED; handlers of anything else
        pending (a connect) are dropped."""
        ptr, self._ptr = self._ptr, None
        if ptr is None:
            return
        self._lib.iscsi_destroy_context(ptr)
        for key in self._keys:
            _handlers.pop(key, None)
        self._keys.clear()

    def __del__(self):
        if getattr(self, "_ptr", None) is not None:
            LOG.warning("iSCSI context garbage-collected without destroy()")
            self.destroy()


def _is_noise(text: str) -> bool:
    return ("reconnect" in text or "memory blocks lost" in text
            or not text)


def iovec_for(buffer, offset: int, length: int) -> ctypes.Array:
    """A one-element ``ScsiIovec`` array covering ``buffer[offset:+length]``.

    ``buffer`` must be a writable bytes-like object (a bytearray, or a
    writable memoryview of one); its memory must not move while the
    iovec is in use, so keep a reference (a bytearray cannot be resized
    while a memoryview/ctypes export of it exists).
    """
    arr = (ctypes.c_char * length).from_buffer(buffer, offset)
    iov = (ScsiIovec * 1)()
    iov[0].iov_base = ctypes.addressof(arr)
    iov[0].iov_len = length
    iov._keep = arr            # the export pins the buffer
    return iov
