"""The sans-IO NBD client protocol, fed crafted server bytes (no network)."""

import errno
import struct
import time

import pytest

from vmthunder.blockdev import Extent
from vmthunder.nbd import constants as c
from vmthunder.nbd.client_protocol import (BlockStatusDone, Done,
                                           ExportEntry, ExportList,
                                           HandshakeDone, NbdClientProtocol,
                                           NbdHandshakeError,
                                           NbdProtocolError, ReadDone,
                                           RequestFailed)

MiB = 1024 * 1024
FLAGS_RW = (c.FLAG_HAS_FLAGS | c.FLAG_SEND_FLUSH | c.FLAG_SEND_FUA
            | c.FLAG_SEND_TRIM | c.FLAG_SEND_WRITE_ZEROES)


# -- what a server would send ------------------------------------------

def greeting(flags=c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES):
    return struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, flags)


def opt_reply(option, rtype, payload=b""):
    return struct.pack(">QIII", c.OPT_REPLY_MAGIC, option, rtype,
                       len(payload)) + payload


def info_export(size, flags=FLAGS_RW):
    return opt_reply(c.OPT_GO, c.REP_INFO,
                     struct.pack(">HQH", c.INFO_EXPORT, size, flags))


def info_block_size(minimum=1, preferred=4096, maximum=32 * MiB):
    return opt_reply(c.OPT_GO, c.REP_INFO,
                     struct.pack(">HIII", c.INFO_BLOCK_SIZE, minimum,
                                 preferred, maximum))


def meta_context(cid, name):
    return opt_reply(c.OPT_SET_META_CONTEXT, c.REP_META_CONTEXT,
                     struct.pack(">I", cid) + name.encode())


def simple(handle, error=0, data=b""):
    return struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, error, handle) + data


def chunk(handle, rtype, payload=b"", done=False):
    flags = c.REPLY_FLAG_DONE if done else 0
    return struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, flags, rtype,
                       handle, len(payload)) + payload


def data_chunk(handle, offset, data, done=False):
    return chunk(handle, c.REPLY_TYPE_OFFSET_DATA,
                 struct.pack(">Q", offset) + data, done)


def hole_chunk(handle, offset, size, done=False):
    return chunk(handle, c.REPLY_TYPE_OFFSET_HOLE,
                 struct.pack(">QI", offset, size), done)


def none_chunk(handle):
    return chunk(handle, c.REPLY_TYPE_NONE, done=True)


def error_chunk(handle, err, message=b"", done=True):
    return chunk(handle, c.REPLY_TYPE_ERROR,
                 struct.pack(">IH", err, len(message)) + message, done)


def status_chunk(handle, cid, extents, done=True):
    payload = struct.pack(">I", cid) + b"".join(
        struct.pack(">II", n, f) for n, f in extents)
    return chunk(handle, c.REPLY_TYPE_BLOCK_STATUS, payload, done)


def parse_options(data):
    """Client bytes after the flags -> [(option, payload)]."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, length = struct.unpack_from(">QII", data, pos)
        assert magic == c.IHAVEOPT
        out.append((opt, data[pos + 16:pos + 16 + length]))
        pos += 16 + length
    return out


def parse_request(data):
    magic, flags, cmd, handle, offset, length = struct.unpack_from(
        ">IHHQQI", data)
    assert magic == c.REQUEST_MAGIC
    return flags, cmd, handle, offset, length, data[28:]


def connected(size=64 * MiB, flags=FLAGS_RW, structured=True,
              contexts=(), block=(1, 4096, 32 * MiB)):
    """A protocol that went through the whole handshake."""
    p = NbdClientProtocol("disk", want_structured=structured,
                          meta_contexts=tuple(name for name, _ in contexts))
    p.receive_data(greeting())
    p.data_to_send()
    if structured:
        p.receive_data(opt_reply(c.OPT_STRUCTURED_REPLY, c.REP_ACK))
        p.data_to_send()
        if contexts:
            for name, cid in contexts:
                p.receive_data(meta_context(cid, name))
            p.receive_data(opt_reply(c.OPT_SET_META_CONTEXT, c.REP_ACK))
            p.data_to_send()
    events = p.receive_data(info_export(size, flags)
                            + info_block_size(*block)
                            + opt_reply(c.OPT_GO, c.REP_ACK))
    assert isinstance(events[-1], HandshakeDone)
    return p


# -- handshake ---------------------------------------------------------

def test_full_handshake():
    p = NbdClientProtocol("disk", meta_contexts=("base:allocation",))
    assert p.data_to_send() == b""           # the server speaks first
    assert p.receive_data(greeting()) == []
    out = p.data_to_send()
    assert struct.unpack_from(">I", out)[0] == (
        c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES)
    assert parse_options(out[4:]) == [(c.OPT_STRUCTURED_REPLY, b"")]

    p.receive_data(opt_reply(c.OPT_STRUCTURED_REPLY, c.REP_ACK))
    [(opt, payload)] = parse_options(p.data_to_send())
    assert opt == c.OPT_SET_META_CONTEXT
    assert payload == (struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1)
                       + struct.pack(">I", 15) + b"base:allocation")

    p.receive_data(meta_context(3, "base:allocation"))
    p.receive_data(opt_reply(c.OPT_SET_META_CONTEXT, c.REP_ACK))
    [(opt, payload)] = parse_options(p.data_to_send())
    assert opt == c.OPT_GO
    assert payload == (struct.pack(">I", 4) + b"disk"
                       + struct.pack(">HH", 1, c.INFO_BLOCK_SIZE))

    # Replies may arrive one byte at a time.
    events = []
    for b in (info_export(10 * MiB) + info_block_size(512, 4096, 8 * MiB)
              + opt_reply(c.OPT_GO, c.REP_ACK)):
        events += p.receive_data(bytes([b]))
    [done] = events
    assert isinstance(done, HandshakeDone)
    e = done.export
    assert (e.size, e.flags) == (10 * MiB, FLAGS_RW)
    assert (e.min_block, e.preferred_block, e.max_block) == (
        512, 4096, 8 * MiB)
    assert e.structured_replies and dict(e.contexts) == {
        "base:allocation": 3}
    assert e.can_flush and e.can_fua and e.can_trim and not e.read_only
    assert p.size == 10 * MiB and p.block_sizes == (512, 4096, 8 * MiB)


def test_go_unsupported_falls_back_to_export_name():
    p = NbdClientProtocol("disk", want_structured=False)
    p.receive_data(greeting(c.FLAG_FIXED_NEWSTYLE))     # no NO_ZEROES
    out = p.data_to_send()
    assert struct.unpack_from(">I", out)[0] == c.FLAG_C_FIXED_NEWSTYLE
    assert parse_options(out[4:])[0][0] == c.OPT_GO
    p.receive_data(opt_reply(c.OPT_GO, c.REP_ERR_UNSUP))
    assert parse_options(p.data_to_send()) == [(c.OPT_EXPORT_NAME, b"disk")]
    reply = struct.pack(">QH", 5 * MiB, c.FLAG_HAS_FLAGS | c.FLAG_READ_ONLY)
    assert p.receive_data(reply) == []
    [done] = p.receive_data(bytes(124))                 # the zero padding
    assert done.export.size == 5 * MiB and done.export.read_only
    assert not done.export.structured_replies
    assert done.export.max_block == c.DEFAULT_MAX_PAYLOAD
    assert not done.export.block_size_advertised


def test_structured_refused_skips_meta_context():
    p = NbdClientProtocol("", meta_contexts=("base:allocation",))
    p.receive_data(greeting())
    p.data_to_send()
    p.receive_data(opt_reply(c.OPT_STRUCTURED_REPLY, c.REP_ERR_UNSUP))
    [(opt, _)] = parse_options(p.data_to_send())
    assert opt == c.OPT_GO
    [done] = p.receive_data(info_export(MiB) + opt_reply(c.OPT_GO,
                                                         c.REP_ACK))
    assert not done.export.structured_replies and not done.export.contexts
    with pytest.raises(ValueError, match="no metadata context"):
        p.block_status(0, 512)


def test_unknown_export_is_a_clear_handshake_error():
    p = NbdClientProtocol("nosuch", want_structured=False)
    p.receive_data(greeting())
    p.data_to_send()
    with pytest.raises(NbdHandshakeError) as info:
        p.receive_data(opt_reply(c.OPT_GO, c.REP_ERR_UNKNOWN,
                                 b"export not found"))
    msg = str(info.value)
    assert "'nosuch'" in msg and "export not found" in msg
    assert "NBD_REP_ERR_UNKNOWN" in msg
    assert info.value.reply == c.REP_ERR_UNKNOWN
    with pytest.raises(NbdHandshakeError):
        p.receive_data(b"x")               # the connection stays failed


def test_export_name_refused_by_closing():
    p = NbdClientProtocol("gone", want_structured=False)
    p.receive_data(greeting())
    p.receive_data(opt_reply(c.OPT_GO, c.REP_ERR_UNSUP))
    with pytest.raises(NbdHandshakeError, match="'gone' does not exist"):
        p.eof_received()


def test_bad_greeting_magic():
    p = NbdClientProtocol("x")
    with pytest.raises(NbdProtocolError, match="not an NBD server"):
        p.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_oldstyle_server_is_named():
    p = NbdClientProtocol("x")
    with pytest.raises(NbdProtocolError, match="oldstyle"):
        p.receive_data(struct.pack(">QQ", c.NBDMAGIC, c.OLDSTYLE_MAGIC)
                       + bytes(8))


def test_bad_option_reply_magic_and_wrong_option():
    p = NbdClientProtocol("x", want_structured=False)
    p.receive_data(greeting())
    with pytest.raises(NbdProtocolError, match="option reply magic"):
        p.receive_data(struct.pack(">QIII", 0x1234, c.OPT_GO, c.REP_ACK, 0))
    p = NbdClientProtocol("x", want_structured=False)
    p.receive_data(greeting())
    with pytest.raises(NbdProtocolError, match="while NBD_OPT_GO"):
        p.receive_data(opt_reply(c.OPT_LIST, c.REP_ACK))


def test_option_reply_too_long():
    p = NbdClientProtocol("x", want_structured=False)
    p.receive_data(greeting())
    with pytest.raises(NbdProtocolError, match="at most"):
        p.receive_data(struct.pack(">QIII", c.OPT_REPLY_MAGIC, c.OPT_GO,
                                   c.REP_INFO, 1 << 30))


def test_go_ack_without_export_info():
    p = NbdClientProtocol("x", want_structured=False)
    p.receive_data(greeting())
    with pytest.raises(NbdProtocolError, match="NBD_INFO_EXPORT"):
        p.receive_data(opt_reply(c.OPT_GO, c.REP_ACK))


def test_unasked_meta_context():
    p = NbdClientProtocol("x", meta_contexts=("base:allocation",))
    p.receive_data(greeting())
    p.receive_data(opt_reply(c.OPT_STRUCTURED_REPLY, c.REP_ACK))
    with pytest.raises(NbdProtocolError, match="not asked for"):
        p.receive_data(meta_context(1, "qemu:dirty-bitmap:x"))


def test_bad_block_sizes():
    p = NbdClientProtocol("x", want_structured=False)
    p.receive_data(greeting())
    with pytest.raises(NbdProtocolError, match="minimum block size 3"):
        p.receive_data(info_block_size(3, 4096, 4096))


def test_tls_required_is_fatal_even_for_structured_reply():
    p = NbdClientProtocol("x")
    p.receive_data(greeting())
    with pytest.raises(NbdHandshakeError, match="requires TLS"):
        p.receive_data(opt_reply(c.OPT_STRUCTURED_REPLY, c.REP_ERR_TLS_REQD))


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="namespace"):
        NbdClientProtocol("x", meta_contexts=("allocation",))
    with pytest.raises(TypeError, match="not the string"):
        NbdClientProtocol("x", meta_contexts="base:allocation")
    with pytest.raises(ValueError, match="at most 4096"):
        NbdClientProtocol("x" * 5000)
    with pytest.raises(ValueError, match="NUL"):
        NbdClientProtocol("a\0b")


def test_list_exports():
    p = NbdClientProtocol(list_exports=True)
    p.receive_data(greeting())
    out = p.data_to_send()
    assert parse_options(out[4:]) == [(c.OPT_LIST, b"")]
    entry = opt_reply(c.OPT_LIST, c.REP_SERVER,
                      struct.pack(">I", 3) + b"one" + b"first disk")
    entry2 = opt_reply(c.OPT_LIST, c.REP_SERVER, struct.pack(">I", 3)
                       + b"two")
    [ev] = p.receive_data(entry + entry2 + opt_reply(c.OPT_LIST, c.REP_ACK))
    assert ev == ExportList((ExportEntry("one", "first disk"),
                             ExportEntry("two", "")))
    assert parse_options(p.data_to_send()) == [(c.OPT_ABORT, b"")]
    # The ack to the abort, then the end: nothing more happens.
    assert p.receive_data(opt_reply(c.OPT_ABORT, c.REP_ACK)) == []
    p.eof_received()


def test_list_bad_name_length():
    p = NbdClientProtocol(list_exports=True)
    p.receive_data(greeting())
    with pytest.raises(NbdProtocolError, match="name length 99"):
        p.receive_data(opt_reply(c.OPT_LIST, c.REP_SERVER,
                                 struct.pack(">I", 99) + b"abc"))


# -- requests ----------------------------------------------------------

def test_request_encoding():
    p = connected(contexts=(("base:allocation", 1),))
    h1, wire = p.read(4096, 512)
    assert parse_request(wire) == (0, c.CMD_READ, h1, 4096, 512, b"")
    h2, wire = p.write(100, b"abc", fua=True)
    assert parse_request(wire) == (c.CMD_FLAG_FUA, c.CMD_WRITE, h2, 100, 3,
                                   b"abc")
    h3, wire = p.flush()
    assert parse_request(wire)[:5] == (0, c.CMD_FLUSH, h3, 0, 0)
    h4, wire = p.trim(0, 1 << 20)
    assert parse_request(wire)[:5] == (0, c.CMD_TRIM, h4, 0, 1 << 20)
    h5, wire = p.write_zeroes(512, 1024, no_hole=True)
    assert parse_request(wire)[:5] == (c.CMD_FLAG_NO_HOLE,
                                       c.CMD_WRITE_ZEROES, h5, 512, 1024)
    h6, wire = p.block_status(0, 4096, req_one=True)
    assert parse_request(wire)[:5] == (c.CMD_FLAG_REQ_ONE,
                                       c.CMD_BLOCK_STATUS, h6, 0, 4096)
    assert len({h1, h2, h3, h4, h5, h6}) == 6 and p.in_flight == 6
    wire = p.disconnect()
    assert parse_request(wire)[1] == c.CMD_DISC
    with pytest.raises(RuntimeError, match="NBD_CMD_DISC"):
        p.read(0, 1)


def test_request_checks():
    p = connected(size=MiB, flags=c.FLAG_HAS_FLAGS | c.FLAG_READ_ONLY)
    with pytest.raises(ValueError, match="past the end"):
        p.read(MiB - 10, 11)
    with pytest.raises(ValueError, match="read-only"):
        p.write(0, b"x")
    with pytest.raises(ValueError, match="flush"):
        p.flush()
    with pytest.raises(ValueError, match="length must be"):
        p.read(0, 0)
    with pytest.raises(ValueError, match="maximum block size"):
        connected(size=64 * MiB).read(0, 33 * MiB)
    with pytest.raises(ValueError, match="FUA"):
        connected(flags=c.FLAG_HAS_FLAGS).write(0, b"x", fua=True)
    aligned = connected(block=(512, 4096, MiB))
    with pytest.raises(ValueError, match="minimum block size 512"):
        aligned.read(100, 512)
    with pytest.raises(RuntimeError, match="handshake"):
        NbdClientProtocol("x").read(0, 1)


# -- replies -----------------------------------------------------------

def test_simple_read_reply_in_pieces():
    p = connected(structured=False)
    h, _ = p.read(0, 1000)
    data = bytes(range(250)) * 4
    wire = simple(h, data=data)
    events = []
    for i in range(0, len(wire), 7):
        events += p.receive_data(wire[i:i + 7])
    assert events == [ReadDone(h, data)]
    assert p.in_flight == 0


def test_simple_reply_error_and_done():
    p = connected(structured=False)
    hr, _ = p.read(0, 10)
    hw, _ = p.write(0, b"x")
    events = p.receive_data(simple(hw) + simple(hr, error=c.EIO))
    assert events[0] == Done(hw)
    assert isinstance(events[1], RequestFailed)
    assert events[1].errno == errno.EIO and "EIO" in events[1].message
    # No payload follows an error: the next reply parses normally.
    h, _ = p.read(0, 2)
    assert p.receive_data(simple(h, data=b"ok")) == [ReadDone(h, b"ok")]


def test_structured_read_two_chunks_out_of_order():
    p = connected()
    h, _ = p.read(1000, 200)
    data = bytes(i % 251 for i in range(200))
    wire = (data_chunk(h, 1100, data[100:]) + data_chunk(h, 1000, data[:100])
            + none_chunk(h))
    assert p.receive_data(wire[:50]) == []
    assert p.receive_data(wire[50:]) == [ReadDone(h, data)]


def test_structured_read_data_and_hole_done_on_last_chunk():
    p = connected()
    h, _ = p.read(0, 4096)
    wire = hole_chunk(h, 0, 1024) + data_chunk(h, 1024, b"\xff" * 3072,
                                               done=True)
    [ev] = p.receive_data(wire)
    assert ev == ReadDone(h, bytes(1024) + b"\xff" * 3072)


def test_interleaved_replies_to_concurrent_reads():
    p = connected()
    ha, _ = p.read(0, 8)
    hb, _ = p.read(8, 8)
    wire = (data_chunk(hb, 12, b"BBBB") + data_chunk(ha, 0, b"AAAA")
            + data_chunk(hb, 8, b"bbbb") + data_chunk(ha, 4, b"aaaa",
                                                      done=True)
            + none_chunk(hb))
    events = p.receive_data(wire)
    assert events == [ReadDone(ha, b"AAAAaaaa"), ReadDone(hb, b"bbbbBBBB")]


def test_error_chunk_fails_only_that_request():
    p = connected()
    h, _ = p.read(0, 512)
    h2, _ = p.read(0, 4)
    [ev] = p.receive_data(data_chunk(h, 0, bytes(256))
                          + error_chunk(h, c.EIO, b"disk on fire"))
    assert isinstance(ev, RequestFailed) and ev.handle == h
    assert ev.errno == errno.EIO and "disk on fire" in ev.message
    assert p.receive_data(data_chunk(h2, 0, b"good", True)) == [
        ReadDone(h2, b"good")]


def test_error_offset_chunk():
    p = connected()
    h, _ = p.write(4096, b"x" * 512)
    payload = struct.pack(">IH", c.ENOSPC, 4) + b"full" + struct.pack(
        ">Q", 4096)
    [ev] = p.receive_data(chunk(h, c.REPLY_TYPE_ERROR_OFFSET, payload)
                          + none_chunk(h))
    assert ev.errno == errno.ENOSPC and "offset 4096" in ev.message


def test_unknown_error_type_is_an_error_not_a_disconnect():
    p = connected()
    h, _ = p.flush()
    [ev] = p.receive_data(chunk(h, c.REPLY_TYPE_FLAG_ERROR | 77,
                                struct.pack(">IH", c.EPERM, 0), done=True))
    assert ev == RequestFailed(h, errno.EPERM, ev.message)


def test_unknown_non_error_chunk_type():
    p = connected()
    h, _ = p.flush()
    with pytest.raises(NbdProtocolError, match="unknown structured"):
        p.receive_data(chunk(h, 42, b"", done=True))


def test_structured_write_and_simple_flush():
    p = connected()
    hw, _ = p.write(0, b"abc")
    hf, _ = p.flush()
    assert p.receive_data(none_chunk(hw) + simple(hf)) == [Done(hw),
                                                          Done(hf)]


def test_block_status_reply():
    p = connected(contexts=(("base:allocation", 5),
                            ("vmthunder:cache", 9)))
    h, _ = p.block_status(0, 8192)
    wire = (status_chunk(h, 9, [(8192, 1)], done=False)
            + status_chunk(h, 5, [(4096, 3), (8192, 0)]))   # too long: clip
    [ev] = p.receive_data(wire)
    assert isinstance(ev, BlockStatusDone)
    assert ev.extents == {5: [Extent(4096, 3), Extent(4096, 0)],
                          9: [Extent(8192, 1)]}


def test_block_status_unknown_context_id():
    p = connected(contexts=(("base:allocation", 5),))
    h, _ = p.block_status(0, 4096)
    with pytest.raises(NbdProtocolError, match="context id 6"):
        p.receive_data(status_chunk(h, 6, [(4096, 0)]))


def test_block_status_without_extents():
    p = connected(contexts=(("base:allocation", 5),))
    h, _ = p.block_status(0, 4096)
    with pytest.raises(NbdProtocolError, match="without any block status"):
        p.receive_data(none_chunk(h))


# -- malformed transmission replies -------------------------------------

def test_wrong_reply_magic():
    p = connected()
    p.read(0, 4)
    with pytest.raises(NbdProtocolError, match="bad reply magic"):
        p.receive_data(b"\xde\xad\xbe\xef" + bytes(16))
    with pytest.raises(NbdProtocolError):          # stays failed
        p.receive_data(b"more")


def test_unknown_handle():
    p = connected()
    h, _ = p.read(0, 4)
    with pytest.raises(NbdProtocolError, match="not a request in flight"):
        p.receive_data(data_chunk(h + 1000, 0, b"abcd", done=True))


def test_reply_after_completion_is_unknown_handle():
    p = connected()
    h, _ = p.read(0, 4)
    p.receive_data(data_chunk(h, 0, b"abcd", done=True))
    with pytest.raises(NbdProtocolError, match="not a request in flight"):
        p.receive_data(none_chunk(h))


def test_truncated_reply_then_eof():
    p = connected()
    h, _ = p.read(0, 100)
    assert p.receive_data(data_chunk(h, 0, bytes(100), True)[:60]) == []
    with pytest.raises(NbdProtocolError, match="middle of a reply"):
        p.eof_received()


def test_eof_with_requests_in_flight():
    p = connected()
    p.read(0, 100)
    with pytest.raises(NbdProtocolError, match="1 request"):
        p.eof_received()


def test_clean_eof_after_disconnect():
    """EOF after NBD_CMD_DISC with nothing in flight is the clean end of
    the connection: no error, the protocol is finished and stays so."""
    # The same EOF without the disconnect is an error.
    with pytest.raises(NbdProtocolError,
                       match="^server closed the connection$"):
        connected().eof_received()
    p = connected()
    assert parse_request(p.disconnect())[1] == c.CMD_DISC
    assert p.in_flight == 0 and p.phase == "transmission"
    p.eof_received()                    # no exception
    assert p.phase == "finished"
    p.eof_received()                    # a second EOF is still clean
    assert p.phase == "finished"
    with pytest.raises(RuntimeError, match="NBD_CMD_DISC"):
        p.read(0, 1)
    # A disconnect does not excuse a request still waiting for its reply.
    p = connected()
    p.read(0, 100)
    p.disconnect()
    with pytest.raises(NbdProtocolError, match="1 request"):
        p.eof_received()


def test_chunk_outside_requested_range():
    p = connected()
    h, _ = p.read(4096, 512)
    with pytest.raises(NbdProtocolError, match="outside the range"):
        p.receive_data(data_chunk(h, 4096 + 256, bytes(512), done=True))
    p = connected()
    h, _ = p.read(4096, 512)
    with pytest.raises(NbdProtocolError, match="outside the range"):
        p.receive_data(hole_chunk(h, 0, 512, done=True))


def test_data_chunk_longer_than_request_fails_before_payload():
    p = connected()
    h, _ = p.read(0, 16)
    header = struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, 0,
                         c.REPLY_TYPE_OFFSET_DATA, h, 8 + (1 << 30))
    with pytest.raises(NbdProtocolError, match="more than"):
        p.receive_data(header)


def test_simple_reply_to_read_after_structured_negotiated():
    p = connected()
    h, _ = p.read(0, 4)
    with pytest.raises(NbdProtocolError, match="simple reply"):
        p.receive_data(simple(h, data=b"abcd"))


def test_structured_reply_not_negotiated():
    p = connected(structured=False)
    h, _ = p.read(0, 4)
    with pytest.raises(NbdProtocolError, match="not negotiated"):
        p.receive_data(data_chunk(h, 0, b"abcd", True))


def test_success_with_missing_data():
    p = connected()
    h, _ = p.read(0, 100)
    with pytest.raises(NbdProtocolError, match="only 50 of 100"):
        p.receive_data(data_chunk(h, 0, bytes(50)) + none_chunk(h))


def test_overlapping_chunks():
    p = connected()
    h, _ = p.read(0, 100)
    with pytest.raises(NbdProtocolError, match="overlapping"):
        p.receive_data(data_chunk(h, 0, bytes(60)) + hole_chunk(h, 40, 40)
                       + none_chunk(h))


def test_none_chunk_without_done_flag():
    p = connected()
    h, _ = p.flush()
    with pytest.raises(NbdProtocolError, match="DONE"):
        p.receive_data(chunk(h, c.REPLY_TYPE_NONE))


def test_data_chunk_for_a_write():
    p = connected()
    h, _ = p.write(0, b"abcd")
    with pytest.raises(NbdProtocolError, match="OFFSET_DATA"):
        p.receive_data(data_chunk(h, 0, b"abcd", True))


def test_error_chunk_message_too_long():
    p = connected()
    h, _ = p.flush()
    with pytest.raises(NbdProtocolError, match="message length"):
        p.receive_data(chunk(h, c.REPLY_TYPE_ERROR,
                             struct.pack(">IH", c.EIO, 500) + b"short",
                             done=True))


# -- efficiency ----------------------------------------------------------

def test_large_read_in_small_pieces_is_linear():
    """32 MiB in 64 KiB pieces, split over several chunks: fast."""
    p = connected()
    size = 32 * MiB
    h, _ = p.read(0, size)
    payload = bytes(range(256)) * (size // 256)
    half = size // 2
    wire = (data_chunk(h, half, payload[half:])
            + data_chunk(h, 0, payload[:half]) + none_chunk(h))
    start = time.perf_counter()
    events = []
    for i in range(0, len(wire), 65536 + 13):      # unaligned pieces
        events += p.receive_data(wire[i:i + 65536 + 13])
    elapsed = time.perf_counter() - start
    assert events == [ReadDone(h, payload)]
    assert elapsed < 2.0, f"parsing 32 MiB took {elapsed:.2f} s"


def test_many_small_replies_in_one_buffer():
    p = connected(structured=False)
    handles = [p.read(i * 4, 4)[0] for i in range(5000)]
    wire = b"".join(simple(h, data=struct.pack(">I", h)) for h in handles)
    events = []
    for i in range(0, len(wire), 1000):
        events += p.receive_data(wire[i:i + 1000])
    assert [e.handle for e in events] == handles
    assert all(e.data == struct.pack(">I", e.handle) for e in events)


# -- zero-copy input (asyncio.BufferedProtocol style) ---------------------

def feed_buffered(p, wire, step=4096):
    """Deliver ``wire`` through get_buffer/buffer_updated like asyncio."""
    events = []
    pos = 0
    while pos < len(wire):
        buf = p.get_buffer(-1)
        n = min(len(buf), step, len(wire) - pos)
        buf[:n] = wire[pos:pos + n]
        pos += n
        events += p.buffer_updated(n)
    return events


def test_buffered_input_handshake_and_reads():
    p = NbdClientProtocol("disk", want_structured=False)
    events = feed_buffered(p, greeting(), step=5)
    assert events == [] and p.data_to_send()
    events = feed_buffered(p, info_export(4 * MiB)
                           + opt_reply(c.OPT_GO, c.REP_ACK), step=7)
    assert isinstance(events[0], HandshakeDone)
    h1, _ = p.read(0, MiB)
    h2, _ = p.read(0, 10)
    data = bytes(range(256)) * (MiB // 256)
    wire = simple(h1, data=data) + simple(h2, data=data[:10])
    assert feed_buffered(p, wire, step=100000) == [
        ReadDone(h1, data), ReadDone(h2, data[:10])]


def test_buffered_payload_goes_straight_into_the_result():
    p = connected()
    h, _ = p.read(0, 300000)
    # The chunk header and the offset; the payload comes next.
    p.receive_data(data_chunk(h, 0, bytes(300000))[:28])
    buf = p.get_buffer(-1)
    assert len(buf) == 300000                      # the result itself
    buf[:300000] = b"z" * 300000
    assert p.buffer_updated(300000) == []          # no DONE flag yet
    assert p.receive_data(none_chunk(h)) == [ReadDone(h, b"z" * 300000)]


def test_read_into_caller_buffer_zeroes_holes():
    p = connected()
    target = bytearray(b"\xee" * 3000)
    h, _ = p.read(1000, 3000, into=target)
    events = p.receive_data(data_chunk(h, 1000, b"a" * 1000)
                            + hole_chunk(h, 2000, 1500)
                            + data_chunk(h, 3500, b"b" * 500, done=True))
    assert events == [Done(h)]
    assert target == b"a" * 1000 + bytes(1500) + b"b" * 500
    with pytest.raises(ValueError, match="exactly 10 bytes"):
        p.read(0, 10, into=bytearray(9))
    with pytest.raises(ValueError, match="writable"):
        p.read(0, 10, into=bytes(10))


def test_read_of_only_holes():
    p = connected()
    h, _ = p.read(0, 8192)
    [ev] = p.receive_data(hole_chunk(h, 0, 8192, done=True))
    assert ev == ReadDone(h, bytes(8192))


# -- addresses and URIs (pure functions of client.py) ----------------------

def test_parse_address():
    from vmthunder.nbd.client import NbdAddress, parse_address
    assert parse_address("tcp:127.0.0.1:10809") == NbdAddress(
        "tcp", host="127.0.0.1", port=10809)
    assert parse_address("tcp:[::1]:99") == NbdAddress("tcp", host="::1",
                                                       port=99)
    assert str(parse_address("tcp:[::1]:99")) == "tcp:[::1]:99"
    assert parse_address("unix:/run/x.sock") == NbdAddress(
        "unix", path="/run/x.sock")
    for bad, why in [("127.0.0.1:10809", "expected 'tcp:HOST:PORT'"),
                     ("tcp:host", "expected 'tcp:HOST:PORT'"),
                     ("tcp:host:0", "bad port '0'"),
                     ("tcp:host:http", "bad port 'http'"),
                     ("tcp:::1:5", "IPv6 host in brackets"),
                     ("unix:", "no socket path")]:
        with pytest.raises(ValueError, match=why):
            parse_address(bad)


def test_parse_nbd_uri():
    from vmthunder.nbd.client import parse_nbd_uri
    assert parse_nbd_uri("nbd://example.com/disk") == (
        "tcp:example.com:10809", "disk")
    assert parse_nbd_uri("nbd://10.0.0.1:2000/") == ("tcp:10.0.0.1:2000", "")
    assert parse_nbd_uri("nbd://[fe80::1]:2000/a%20b") == (
        "tcp:[fe80::1]:2000", "a b")
    assert parse_nbd_uri("nbd+unix:///vm1?socket=/run/nbd.sock") == (
        "unix:/run/nbd.sock", "vm1")
    assert parse_nbd_uri("nbd+unix://?socket=/s") == ("unix:/s", "")
    with pytest.raises(ValueError, match="TLS"):
        parse_nbd_uri("nbds://host/x")
    with pytest.raises(ValueError, match="socket=PATH"):
        parse_nbd_uri("nbd+unix:///x")
    with pytest.raises(ValueError, match="not an NBD URI"):
        parse_nbd_uri("http://host/x")
    with pytest.raises(ValueError, match="no host"):
        parse_nbd_uri("nbd:///x")
