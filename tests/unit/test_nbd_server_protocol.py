"""NbdServerProtocol with no network: bytes in, bytes and events out."""

import struct

import pytest

from vmthunder.nbd import constants as c
from vmthunder.nbd import server_protocol as sp

SIZE = 10 * 1024 * 1024
MAX_REQUEST = 1024 * 1024

EXPORTS = {
    "disk": sp.ExportInfo(
        name="disk", size=SIZE, read_only=True, description="the cache",
        contexts=(c.BASE_ALLOCATION, c.VMTHUNDER_CACHE)),
    "vm1": sp.ExportInfo(name="vm1", size=SIZE, read_only=False,
                         description="VM vm1"),
}


# -- client-side encoders -------------------------------------------------

def client_flags(flags=c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES):
    return struct.pack(">I", flags)


def option(opt, data=b""):
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def go_payload(name, infos=()):
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw
            + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_payload(name, queries):
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def request(cmd, handle, offset, length, flags=0):
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, handle,
                       offset, length)


# -- server-side decoders -------------------------------------------------

def parse_opt_replies(data):
    """[(option, type, payload)] of a run of option replies; all of it."""
    replies = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == c.OPT_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        pos += 20
        payload = data[pos:pos + length]
        assert len(payload) == length, "truncated option reply"
        pos += length
        replies.append((opt, rtype, payload))
    return replies


def parse_simple_reply(data):
    magic, err, handle = struct.unpack(">IIQ", data[:16])
    assert magic == c.SIMPLE_REPLY_MAGIC
    return err, handle, data[16:]


def parse_structured_replies(data):
    """[(flags, type, handle, payload)] of structured reply chunks."""
    chunks = []
    pos = 0
    while pos < len(data):
        magic, flags, rtype, handle, length = struct.unpack_from(
            ">IHHQI", data, pos)
        assert magic == c.STRUCTURED_REPLY_MAGIC
        pos += 20
        chunks.append((flags, rtype, handle, data[pos:pos + length]))
        pos += length
    return chunks


def new_protocol(**kw):
    return sp.NbdServerProtocol(EXPORTS, max_request=MAX_REQUEST, **kw)


def negotiate(export="vm1", *, structured=False, meta=()):
    """A protocol object in transmission phase on ``export``."""
    proto = new_protocol()
    out, events = proto.receive(client_flags())
    assert out == b"" and events == []
    if structured:
        out, _ = proto.receive(option(c.OPT_STRUCTURED_REPLY))
        assert parse_opt_replies(out) == [
            (c.OPT_STRUCTURED_REPLY, c.REP_ACK, b"")]
    if meta:
        out, _ = proto.receive(option(c.OPT_SET_META_CONTEXT,
                                      meta_payload(export, list(meta))))
        assert parse_opt_replies(out)[-1][1] == c.REP_ACK
    out, events = proto.receive(option(c.OPT_GO, go_payload(export)))
    assert parse_opt_replies(out)[-1][1] == c.REP_ACK
    assert len(events) == 1 and isinstance(events[0], sp.Negotiated)
    return proto


# -- handshake ------------------------------------------------------------

def test_greeting_is_fixed_newstyle_with_no_zeroes():
    greeting = new_protocol().greeting()
    assert len(greeting) == 18
    magic, ihaveopt, flags = struct.unpack(">QQH", greeting)
    assert magic == c.NBDMAGIC
    assert greeting[:8] == b"NBDMAGIC"
    assert ihaveopt == c.IHAVEOPT
    assert greeting[8:16] == b"IHAVEOPT"
    assert flags == c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES


@pytest.mark.parametrize("flags", [0, c.FLAG_C_NO_ZEROES])
def test_client_flags_without_fixed_newstyle_close_with_error(flags):
    proto = new_protocol()
    out, events = proto.receive(client_flags(flags))
    assert out == b""
    assert len(events) == 1
    assert isinstance(events[0], sp.Closed)
    assert events[0].error
    assert "FIXED_NEWSTYLE" in events[0].reason
    assert proto.closed
    # Nothing more is answered once closed.
    assert proto.receive(option(c.OPT_LIST)) == (b"", [])


def test_unknown_client_flags_close_with_error():
    proto = new_protocol()
    _, events = proto.receive(client_flags(c.FLAG_C_FIXED_NEWSTYLE | 0x80))
    assert [type(e) for e in events] == [sp.Closed]
    assert events[0].error and proto.closed


def test_bad_option_magic_closes_with_error():
    proto = new_protocol()
    proto.receive(client_flags())
    _, events = proto.receive(struct.pack(">QII", 0x1122334455667788,
                                          c.OPT_LIST, 0))
    assert [type(e) for e in events] == [sp.Closed]
    assert events[0].error and proto.closed


# -- options --------------------------------------------------------------

def test_list_names_every_export_then_ack():
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(c.OPT_LIST))
    assert events == []
    replies = parse_opt_replies(out)
    assert [r[:2] for r in replies] == [(c.OPT_LIST, c.REP_SERVER),
                                        (c.OPT_LIST, c.REP_SERVER),
                                        (c.OPT_LIST, c.REP_ACK)]
    servers = {}
    for _, _, payload in replies[:2]:
        (nlen,) = struct.unpack_from(">I", payload)
        servers[payload[4:4 + nlen].decode()] = payload[4 + nlen:].decode()
    assert servers == {"disk": "the cache", "vm1": "VM vm1"}
    assert replies[2][2] == b""


def test_list_with_data_is_invalid():
    proto = new_protocol()
    proto.receive(client_flags())
    out, _ = proto.receive(option(c.OPT_LIST, b"x"))
    assert [r[1] for r in parse_opt_replies(out)] == [c.REP_ERR_INVALID]
    assert not proto.closed


def test_unknown_option_is_unsupported_and_negotiation_goes_on():
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(4242, b"whatever"))
    assert events == []
    replies = parse_opt_replies(out)
    assert len(replies) == 1
    assert replies[0][:2] == (4242, c.REP_ERR_UNSUP)
    out, events = proto.receive(option(c.OPT_GO, go_payload("disk")))
    assert parse_opt_replies(out)[-1][1] == c.REP_ACK
    assert isinstance(events[0], sp.Negotiated)


def test_go_sends_export_info_block_size_and_ack_then_negotiated():
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(c.OPT_GO, go_payload("disk")))
    replies = parse_opt_replies(out)
    assert [r[:2] for r in replies] == [(c.OPT_GO, c.REP_INFO),
                                        (c.OPT_GO, c.REP_INFO),
                                        (c.OPT_GO, c.REP_ACK)]
    info_export = replies[0][2]
    assert len(info_export) == 12
    itype, size, flags = struct.unpack(">HQH", info_export)
    assert itype == c.INFO_EXPORT
    assert size == SIZE
    assert flags & c.FLAG_HAS_FLAGS
    assert flags & c.FLAG_READ_ONLY
    assert flags & c.FLAG_SEND_FLUSH
    assert not flags & c.FLAG_SEND_TRIM
    assert not flags & c.FLAG_SEND_WRITE_ZEROES
    itype, minimum, preferred, maximum = struct.unpack(">HIII",
                                                      replies[1][2])
    assert itype == c.INFO_BLOCK_SIZE
    assert (minimum, preferred, maximum) == (1, 4096, MAX_REQUEST)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, sp.Negotiated)
    assert event.export.name == "disk"
    assert event.structured is False
    assert event.contexts == {}
    assert proto.export.name == "disk"


def test_go_on_writable_export_advertises_trim_and_write_zeroes():
    proto = new_protocol()
    proto.receive(client_flags())
    out, _ = proto.receive(option(c.OPT_GO, go_payload("vm1")))
    _, size, flags = struct.unpack(">HQH", parse_opt_replies(out)[0][2])
    assert not flags & c.FLAG_READ_ONLY
    assert flags & c.FLAG_SEND_TRIM
    assert flags & c.FLAG_SEND_WRITE_ZEROES


def test_go_with_info_name_request_sends_the_name():
    proto = new_protocol()
    proto.receive(client_flags())
    out, _ = proto.receive(option(c.OPT_GO, go_payload("vm1",
                                                       [c.INFO_NAME])))
    infos = [p for _, t, p in parse_opt_replies(out) if t == c.REP_INFO]
    assert struct.pack(">H", c.INFO_NAME) + b"vm1" in infos


def test_info_does_not_enter_transmission():
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(c.OPT_INFO, go_payload("vm1")))
    assert parse_opt_replies(out)[-1][:2] == (c.OPT_INFO, c.REP_ACK)
    assert events == []
    # Still in option phase: another option is answered as an option.
    out, _ = proto.receive(option(c.OPT_LIST))
    assert parse_opt_replies(out)[-1][:2] == (c.OPT_LIST, c.REP_ACK)


def test_go_unknown_export_is_err_unknown_and_stays_in_options():
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(c.OPT_GO, go_payload("nope")))
    assert events == []
    replies = parse_opt_replies(out)
    assert [r[1] for r in replies] == [c.REP_ERR_UNKNOWN]
    out, events = proto.receive(option(c.OPT_GO, go_payload("vm1")))
    assert isinstance(events[0], sp.Negotiated)


@pytest.mark.parametrize("payload", [
    b"",                                          # no name length
    struct.pack(">I", 100) + b"vm1",              # name longer than data
    struct.pack(">I", 3) + b"vm1",                # no info count
    struct.pack(">I", 3) + b"vm1" + struct.pack(">H", 2),  # count too big
])
def test_malformed_go_is_err_invalid(payload):
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(c.OPT_GO, payload))
    assert events == []
    assert [r[1] for r in parse_opt_replies(out)] == [c.REP_ERR_INVALID]
    assert not proto.closed


def test_default_export_for_empty_name():
    proto = new_protocol(default_export="vm1")
    proto.receive(client_flags())
    _, events = proto.receive(option(c.OPT_GO, go_payload("")))
    assert events[0].export.name == "vm1"


def test_export_name_option_unknown_closes():
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(c.OPT_EXPORT_NAME, b"nope"))
    assert out == b""
    assert [type(e) for e in events] == [sp.Closed]
    assert events[0].error and proto.closed


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_option_known(no_zeroes):
    proto = new_protocol()
    flags = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES if no_zeroes
                                       else 0)
    proto.receive(client_flags(flags))
    out, events = proto.receive(option(c.OPT_EXPORT_NAME, b"vm1"))
    assert len(out) == (10 if no_zeroes else 134)
    size, tflags = struct.unpack(">QH", out[:10])
    assert size == SIZE and tflags & c.FLAG_HAS_FLAGS
    assert out[10:] == bytes(len(out) - 10)
    assert isinstance(events[0], sp.Negotiated)


def test_abort_acks_and_closes_without_error():
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(c.OPT_ABORT))
    assert parse_opt_replies(out) == [(c.OPT_ABORT, c.REP_ACK, b"")]
    assert [type(e) for e in events] == [sp.Closed]
    assert not events[0].error


def test_oversized_option_is_too_big_and_skipped():
    proto = new_protocol()
    proto.receive(client_flags())
    big = sp.MAX_OPTION_LENGTH + 10
    out, events = proto.receive(struct.pack(">QII", c.IHAVEOPT, 77, big))
    assert [r[:2] for r in parse_opt_replies(out)] == [
        (77, c.REP_ERR_TOO_BIG)]
    # The payload streams in and is thrown away; GO after it works.
    out, _ = proto.receive(bytes(big - 1))
    assert out == b""
    out, events = proto.receive(b"\0" + option(c.OPT_GO, go_payload("vm1")))
    assert parse_opt_replies(out)[-1][1] == c.REP_ACK
    assert isinstance(events[0], sp.Negotiated)


# -- meta contexts --------------------------------------------------------

def test_set_meta_context_before_structured_reply_is_invalid():
    proto = new_protocol()
    proto.receive(client_flags())
    out, events = proto.receive(option(
        c.OPT_SET_META_CONTEXT, meta_payload("disk", [c.BASE_ALLOCATION])))
    assert events == []
    assert [r[:2] for r in parse_opt_replies(out)] == [
        (c.OPT_SET_META_CONTEXT, c.REP_ERR_INVALID)]
    _, events = proto.receive(option(c.OPT_GO, go_payload("disk")))
    assert events[0].contexts == {}


def test_set_meta_context_assigns_ids_and_go_carries_them():
    proto = new_protocol()
    proto.receive(client_flags())
    proto.receive(option(c.OPT_STRUCTURED_REPLY))
    out, _ = proto.receive(option(
        c.OPT_SET_META_CONTEXT,
        meta_payload("disk", [c.BASE_ALLOCATION, c.VMTHUNDER_CACHE,
                              "other:thing"])))
    replies = parse_opt_replies(out)
    assert replies[-1][1] == c.REP_ACK
    contexts = {}
    for opt, rtype, payload in replies[:-1]:
        assert (opt, rtype) == (c.OPT_SET_META_CONTEXT, c.REP_META_CONTEXT)
        (ctx_id,) = struct.unpack_from(">I", payload)
        contexts[payload[4:].decode()] = ctx_id
    assert set(contexts) == {c.BASE_ALLOCATION, c.VMTHUNDER_CACHE}
    assert contexts[c.BASE_ALLOCATION] != contexts[c.VMTHUNDER_CACHE]
    out, events = proto.receive(option(c.OPT_GO, go_payload("disk")))
    event = events[0]
    assert event.structured is True
    assert event.contexts == {v: k for k, v in contexts.items()}
    _, _, flags = struct.unpack(">HQH", parse_opt_replies(out)[0][2])
    assert flags & c.FLAG_SEND_DF


def test_meta_contexts_are_dropped_when_go_names_another_export():
    proto = new_protocol()
    proto.receive(client_flags())
    proto.receive(option(c.OPT_STRUCTURED_REPLY))
    proto.receive(option(c.OPT_SET_META_CONTEXT,
                         meta_payload("disk", [c.BASE_ALLOCATION])))
    _, events = proto.receive(option(c.OPT_GO, go_payload("vm1")))
    assert events[0].contexts == {}


def test_list_meta_context_without_queries_lists_all():
    proto = new_protocol()
    proto.receive(client_flags())
    out, _ = proto.receive(option(c.OPT_LIST_META_CONTEXT,
                                  meta_payload("disk", [])))
    replies = parse_opt_replies(out)
    names = [p[4:].decode() for _, t, p in replies
             if t == c.REP_META_CONTEXT]
    assert names == [c.BASE_ALLOCATION, c.VMTHUNDER_CACHE]
    assert replies[-1][1] == c.REP_ACK


def test_set_meta_context_unknown_export_is_err_unknown():
    proto = new_protocol()
    proto.receive(client_flags())
    proto.receive(option(c.OPT_STRUCTURED_REPLY))
    out, _ = proto.receive(option(
        c.OPT_SET_META_CONTEXT, meta_payload("nope", [c.BASE_ALLOCATION])))
    assert [r[1] for r in parse_opt_replies(out)] == [c.REP_ERR_UNKNOWN]


# -- transmission ---------------------------------------------------------

def test_read_request_becomes_event():
    proto = negotiate("vm1")
    out, events = proto.receive(request(c.CMD_READ, 7, 4096, 512))
    assert out == b""
    assert events == [sp.Request(c.CMD_READ, 0, 7, 4096, 512)]


def test_write_split_across_many_receives_is_one_request():
    proto = negotiate("vm1")
    payload = bytes(range(256)) * 40 + b"tail"       # 10244 bytes
    wire = request(c.CMD_WRITE, 0xDEADBEEF, 12345, len(payload)) + payload
    events = []
    pos = 0
    sizes = [3, 10, 7, 100, 1, 4000]
    i = 0
    while pos < len(wire):
        n = sizes[i % len(sizes)]
        i += 1
        out, got = proto.receive(wire[pos:pos + n])
        assert out == b""
        events += got
        pos += n
        if pos < len(wire):
            assert got == [], f"event before the payload was complete " \
                f"(at byte {pos})"
    assert events == [sp.Request(c.CMD_WRITE, 0, 0xDEADBEEF, 12345,
                                 len(payload), payload)]


def test_requests_split_byte_by_byte():
    proto = negotiate("vm1", structured=True)
    wire = (request(c.CMD_READ, 1, 0, 4096)
            + request(c.CMD_WRITE, 2, 100, 5, c.CMD_FLAG_FUA) + b"hello"
            + request(c.CMD_FLUSH, 3, 0, 0)
            + request(c.CMD_TRIM, 4, 8192, 4096)
            + request(c.CMD_WRITE_ZEROES, 5, 0, 65536))
    events = []
    for i in range(len(wire)):
        out, got = proto.receive(wire[i:i + 1])
        assert out == b""
        events += got
    assert events == [
        sp.Request(c.CMD_READ, 0, 1, 0, 4096),
        sp.Request(c.CMD_WRITE, c.CMD_FLAG_FUA, 2, 100, 5, b"hello"),
        sp.Request(c.CMD_FLUSH, 0, 3, 0, 0),
        sp.Request(c.CMD_TRIM, 0, 4, 8192, 4096),
        sp.Request(c.CMD_WRITE_ZEROES, 0, 5, 0, 65536),
    ]


def test_many_requests_in_one_receive():
    proto = negotiate("vm1")
    wire = b"".join(request(c.CMD_READ, h, h * 512, 512)
                    for h in range(100))
    out, events = proto.receive(wire)
    assert out == b""
    assert [e.handle for e in events] == list(range(100))


def test_oversized_write_payload_is_discarded_and_next_request_parsed():
    proto = negotiate("vm1")
    big = MAX_REQUEST + 1
    out, events = proto.receive(request(c.CMD_WRITE, 9, 0, big))
    err, handle, rest = parse_simple_reply(out)
    assert (err, handle, rest) == (c.EINVAL, 9, b"")
    assert events == []
    # The payload arrives in pieces; none of it becomes a request even if
    # it looks like one.
    fake = request(c.CMD_READ, 666, 0, 512)
    junk = (fake * (big // len(fake) + 1))[:big]
    for pos in range(0, big, 65536):
        out, events = proto.receive(junk[pos:pos + 65536])
        assert (out, events) == (b"", [])
    out, events = proto.receive(request(c.CMD_READ, 10, 0, 512))
    assert out == b""
    assert events == [sp.Request(c.CMD_READ, 0, 10, 0, 512)]


def test_oversized_write_payload_and_next_request_in_one_receive():
    proto = negotiate("vm1", structured=True)
    big = MAX_REQUEST + 4096
    out, events = proto.receive(request(c.CMD_WRITE, 9, 0, big)
                                + bytes(big)
                                + request(c.CMD_READ, 10, 0, 512))
    chunks = parse_structured_replies(out)
    assert len(chunks) == 1
    flags, rtype, handle, payload = chunks[0]
    assert (flags, rtype, handle) == (c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR,
                                      9)
    assert struct.unpack_from(">I", payload)[0] == c.EINVAL
    assert events == [sp.Request(c.CMD_READ, 0, 10, 0, 512)]


def test_disc_closes_without_error():
    proto = negotiate("vm1")
    out, events = proto.receive(request(c.CMD_DISC, 1, 0, 0)
                                + request(c.CMD_READ, 2, 0, 512))
    assert out == b""
    assert len(events) == 1
    assert isinstance(events[0], sp.Closed)
    assert not events[0].error
    assert proto.closed
    assert proto.receive(request(c.CMD_READ, 3, 0, 512)) == (b"", [])


def test_bad_request_magic_closes_with_error():
    proto = negotiate("vm1")
    wire = bytearray(request(c.CMD_READ, 1, 0, 512))
    wire[0] ^= 0xFF
    out, events = proto.receive(bytes(wire))
    assert out == b""
    assert [type(e) for e in events] == [sp.Closed]
    assert events[0].error and proto.closed


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("export,cmd,offset,length,err", [
    ("vm1", c.CMD_READ, SIZE - 511, 512, c.EINVAL),
    ("vm1", c.CMD_READ, 0, 0, c.EINVAL),
    ("vm1", c.CMD_TRIM, SIZE, 1, c.EINVAL),
    ("vm1", c.CMD_WRITE_ZEROES, SIZE - 1, 2, c.ENOSPC),
    ("vm1", c.CMD_FLUSH, 0, 1, c.EINVAL),
    ("vm1", 99, 0, 512, c.EINVAL),
    ("vm1", c.CMD_BLOCK_STATUS, 0, 512, c.EINVAL),
    ("disk", c.CMD_TRIM, 0, 512, c.EPERM),
    ("disk", c.CMD_WRITE_ZEROES, 0, 512, c.EPERM),
])
def test_invalid_requests_get_error_reply(structured, export, cmd, offset,
                                          length, err):
    proto = negotiate(export, structured=structured)
    out, events = proto.receive(request(cmd, 42, offset, length))
    assert events == []
    if structured:
        [(flags, rtype, handle, payload)] = parse_structured_replies(out)
        assert (flags, rtype, handle) == (c.REPLY_FLAG_DONE,
                                          c.REPLY_TYPE_ERROR, 42)
        got, mlen = struct.unpack_from(">IH", payload)
        assert len(payload) == 6 + mlen
    else:
        got, handle, rest = parse_simple_reply(out)
        assert (handle, rest) == (42, b"")
    assert got == err
    # The connection goes on.
    _, events = proto.receive(request(c.CMD_READ, 43, 0, 512))
    assert events == [sp.Request(c.CMD_READ, 0, 43, 0, 512)]


@pytest.mark.parametrize("structured,err", [(False, c.EINVAL),
                                            (True, c.EOVERFLOW)])
def test_oversized_read(structured, err):
    proto = negotiate("vm1", structured=structured)
    out, events = proto.receive(request(c.CMD_READ, 5, 0, MAX_REQUEST + 1))
    assert events == []
    if structured:
        [(_, rtype, handle, payload)] = parse_structured_replies(out)
        assert (rtype, handle) == (c.REPLY_TYPE_ERROR, 5)
        assert struct.unpack_from(">I", payload)[0] == err
    else:
        assert parse_simple_reply(out)[:2] == (err, 5)


def test_write_to_read_only_export_is_eperm_and_payload_skipped():
    proto = negotiate("disk")
    out, events = proto.receive(request(c.CMD_WRITE, 3, 0, 4)
                                + b"abcd" + request(c.CMD_READ, 4, 0, 4))
    assert parse_simple_reply(out) == (c.EPERM, 3, b"")
    assert events == [sp.Request(c.CMD_READ, 0, 4, 0, 4)]


def test_write_past_end_is_enospc_and_payload_skipped():
    proto = negotiate("vm1")
    out, events = proto.receive(request(c.CMD_WRITE, 3, SIZE - 2, 4)
                                + b"abcd" + request(c.CMD_READ, 4, 0, 4))
    assert parse_simple_reply(out) == (c.ENOSPC, 3, b"")
    assert events == [sp.Request(c.CMD_READ, 0, 4, 0, 4)]


def test_block_status_with_context_becomes_request():
    proto = negotiate("disk", structured=True,
                      meta=[c.BASE_ALLOCATION])
    out, events = proto.receive(request(c.CMD_BLOCK_STATUS, 8, 0, 65536))
    assert out == b""
    assert events == [sp.Request(c.CMD_BLOCK_STATUS, 0, 8, 0, 65536)]


# -- reply builders -------------------------------------------------------

def test_simple_reply_builders():
    proto = negotiate("vm1")
    assert parse_simple_reply(proto.reply_ok(5)) == (0, 5, b"")
    assert parse_simple_reply(proto.reply_read_header(6, 0, 10)) == (
        0, 6, b"")
    assert parse_simple_reply(proto.reply_error(7, c.EIO, "x")) == (
        c.EIO, 7, b"")


def test_structured_reply_builders():
    proto = negotiate("disk", structured=True,
                      meta=[c.BASE_ALLOCATION, c.VMTHUNDER_CACHE])
    assert parse_structured_replies(proto.reply_ok(5)) == [
        (c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, 5, b"")]
    header = proto.reply_read_header(6, 4096, 10)
    flags, rtype, handle, length = struct.unpack_from(">HHQI", header, 4)
    assert (flags, rtype, handle, length) == (
        c.REPLY_FLAG_DONE, c.REPLY_TYPE_OFFSET_DATA, 6, 18)
    assert struct.unpack(">Q", header[20:]) == (4096,)
    chunks = parse_structured_replies(proto.reply_block_status(
        9, {1: [(4096, 3), (100, 0)], 2: [(4196, 1)]}))
    assert chunks == [
        (0, c.REPLY_TYPE_BLOCK_STATUS, 9,
         struct.pack(">IIIII", 1, 4096, 3, 100, 0)),
        (c.REPLY_FLAG_DONE, c.REPLY_TYPE_BLOCK_STATUS, 9,
         struct.pack(">III", 2, 4196, 1)),
    ]
