"""FrameParser, the server's side of RFC 6455 without I/O: bytes in, messages and replies out.
Grouped by the RFC's sections; no sockets. Each failure must close with its exact code."""
import random
import struct

import pytest

import app
from tests.twilio_sim import close_code, frame, read_frames

LIMIT = 2000


def parse(data, limit=LIMIT, chunk=None):
    """Messages FrameParser hands back for `data`, fed whole or `chunk` bytes at a time, and
    the parser (its state, close code, error and outgoing bytes)."""
    parser = app.FrameParser(limit)
    messages = []
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        parser.feed(piece)
        while (message := parser.next_message()) is not None:
            messages.append(message)
    return messages, parser


def replies(parser):
    return read_frames(bytes(parser.outgoing))


def failed_with(parser, code):
    """The parser failed the connection with `code`: one close frame carrying it, state closed."""
    (opcode, payload), = replies(parser)
    return opcode == 0x8 and close_code(payload) == code and parser.state == app.State.CLOSED and parser.error


TEXT = '{"event": "media", "payload": "éß€😀"}'


# 5.1 Overview: a server MUST close the connection on a frame that is not masked.

def test_5_1_an_unmasked_client_frame_fails_with_1002():
    messages, parser = parse(frame(0x1, b"{}", mask=None))
    assert messages == [] and failed_with(parser, 1002)
    assert "not masked" in parser.error


def test_5_1_an_unmasked_control_frame_fails_too():
    _, parser = parse(frame(0x1, b"ok") + frame(0x9, b"ping", mask=None))
    assert failed_with(parser, 1002)


# 5.2 Base framing protocol

@pytest.mark.parametrize("length_form", [7, 16, 64])
def test_5_2_every_length_encoding_is_read(length_form):
    assert parse(frame(0x1, TEXT.encode(), length_form=length_form))[0] == [TEXT]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536])
def test_5_2_lengths_at_the_encoding_boundaries(size):
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    messages, parser = parse(frame(0x2, payload), limit=70000)
    assert messages == [payload] and parser.state == app.State.OPEN and not parser.outgoing


def test_5_2_a_stream_split_at_every_byte_gives_the_same_messages():
    data = b"".join(frame(0x1, f"message {i} {TEXT}".encode()) for i in range(20))
    whole, _ = parse(data)
    assert parse(data, chunk=1)[0] == whole == [f"message {i} {TEXT}" for i in range(20)]


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10])
def test_5_2_reserved_bits_without_an_extension_fail_with_1002(rsv):
    assert failed_with(parse(frame(0x1, b"{}", rsv=rsv))[1], 1002)


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_5_2_reserved_opcodes_fail_with_1002(opcode):
    assert failed_with(parse(frame(opcode, b"x"))[1], 1002)


def test_5_2_a_truncated_frame_waits_for_more_bytes():
    data = frame(0x1, TEXT.encode())
    for cut in range(len(data)):
        messages, parser = parse(data[:cut])
        assert messages == [] and parser.state == app.State.OPEN and not parser.outgoing


# 5.3 Client-to-server masking

def test_5_3_unmasking_follows_the_rfc_example():
    # RFC 6455 5.7: a masked "Hello"
    assert parse(bytes.fromhex("818537fa213d7f9f4d5158"))[0] == ["Hello"]


def test_5_3_unmask_matches_the_definition_at_every_length():
    rng = random.Random(7)
    for n in [0, 1, 3, 4, 5, 160, 383, 4096]:
        payload, mask = bytes(rng.getrandbits(8) for _ in range(n)), bytes(rng.getrandbits(8) for _ in range(4))
        assert app.unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# 5.4 Fragmentation

def test_5_4_a_fragmented_message_is_joined_even_inside_a_utf8_sequence():
    data = TEXT.encode()
    cut = data.index("€".encode()) + 1  # inside the euro sign's three bytes
    stream = frame(0x1, data[:cut], fin=False) + frame(0x0, data[cut:cut + 5], fin=False) + frame(0x0, data[cut + 5:])
    assert parse(stream)[0] == [TEXT]


def test_5_4_control_frames_may_come_between_fragments():
    stream = frame(0x1, b'{"a":', fin=False) + frame(0x9, b"hi") + frame(0xA, b"") + frame(0x0, b"1}")
    messages, parser = parse(stream)
    assert messages == ['{"a":1}'] and replies(parser) == [(0xA, b"hi")]


def test_5_4_a_fragmented_binary_message_stays_binary():
    assert parse(frame(0x2, b"\xff\x00", fin=False) + frame(0x0, b"\x01"))[0] == [b"\xff\x00\x01"]


def test_5_4_a_continuation_without_a_message_fails_with_1002():
    assert failed_with(parse(frame(0x0, b"orphan"))[1], 1002)


def test_5_4_a_new_message_inside_a_fragmented_one_fails_with_1002():
    assert failed_with(parse(frame(0x1, b"a", fin=False) + frame(0x1, b"b"))[1], 1002)


# 5.5 Control frames

def test_5_5_a_control_frame_over_125_bytes_fails_with_1002():
    assert failed_with(parse(frame(0x9, b"p" * 126))[1], 1002)


def test_5_5_a_fragmented_control_frame_fails_with_1002():
    assert failed_with(parse(frame(0x9, b"p", fin=False))[1], 1002)


def test_5_5_2_a_ping_is_answered_with_a_pong_of_the_same_payload():
    messages, parser = parse(frame(0x9, b"are you there") + frame(0x1, b"{}"))
    assert messages == ["{}"] and replies(parser) == [(0xA, b"are you there")]


def test_5_5_3_a_pong_asks_for_nothing():
    messages, parser = parse(frame(0xA, b"unsolicited") + frame(0x1, b"{}"))
    assert messages == ["{}"] and not parser.outgoing and parser.state == app.State.OPEN


# 5.5.1 and 7.4 Close

@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999])
def test_5_5_1_a_close_frame_is_answered_with_its_code(code):
    messages, parser = parse(frame(0x8, struct.pack("!H", code) + b"bye") + frame(0x1, b"after the close"))
    assert messages == [] and parser.state == app.State.CLOSED and parser.error is None
    assert replies(parser) == [(0x8, struct.pack("!H", code))]


def test_5_5_1_a_close_frame_without_a_code_is_answered_without_one():
    messages, parser = parse(frame(0x8, b""))
    assert parser.state == app.State.CLOSED and parser.error is None and replies(parser) == [(0x8, b"")]
    assert parser.close_code == 1005


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_7_4_a_close_code_no_peer_may_send_fails_with_1002(code):
    assert failed_with(parse(frame(0x8, struct.pack("!H", code)))[1], 1002)


def test_5_5_1_a_one_byte_close_payload_fails_with_1002():
    assert failed_with(parse(frame(0x8, b"\x03"))[1], 1002)


def test_5_5_1_a_close_reason_that_is_not_utf8_fails_with_1007():
    assert failed_with(parse(frame(0x8, struct.pack("!H", 1000) + b"\xff"))[1], 1007)


def test_5_5_1_our_close_then_the_clients_ends_the_handshake_and_data_between_is_dropped():
    parser = app.FrameParser(LIMIT)
    parser.close(1001, "going away")
    assert parser.state == app.State.CLOSING and replies(parser) == [(0x8, struct.pack("!H", 1001) + b"going away")]
    parser.outgoing.clear()
    parser.feed(frame(0x1, b'{"late": true}') + frame(0x8, struct.pack("!H", 1001)))
    assert parser.next_message() is None
    assert parser.state == app.State.CLOSED and not parser.outgoing, "our close frame is the answer already"


# 8.1 UTF-8 (5.6 data frames)

@pytest.mark.parametrize("payload", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok\xf4\x90\x80\x80"])
def test_8_1_invalid_utf8_in_a_text_message_fails_with_1007(payload):
    messages, parser = parse(frame(0x1, b"{}") + frame(0x1, payload) + frame(0x1, b"{}"))
    assert messages == ["{}"] and failed_with(parser, 1007)


def test_8_1_invalid_utf8_across_fragments_fails_with_1007():
    assert failed_with(parse(frame(0x1, b"\xe2\x82", fin=False) + frame(0x0, b"x"))[1], 1007)


def test_8_1_binary_messages_are_not_utf8_checked():
    assert parse(frame(0x2, b"\xff\xfe"))[0] == [b"\xff\xfe"]


# 10.4 Implementation-specific limits: the message size

def test_10_4_a_frame_over_the_limit_fails_with_1009_from_its_header_alone():
    header_only = frame(0x1, b"", length=2**30)  # no payload sent at all
    messages, parser = parse(header_only + b"x" * 10)
    assert messages == [] and failed_with(parser, 1009)
    assert f"frame of {2**30} bytes over the {LIMIT}-byte limit" in parser.error


def test_10_4_a_frame_at_the_limit_is_accepted():
    assert parse(frame(0x1, b"a" * LIMIT))[0] == ["a" * LIMIT]


def test_10_4_a_fragmented_message_over_the_limit_fails_with_1009():
    stream = b"".join(frame(0x1 if i == 0 else 0x0, b"y" * 800, fin=False) for i in range(3))
    messages, parser = parse(stream)
    assert messages == [] and failed_with(parser, 1009) and "message over" in parser.error


# 7.1.7 Fail the WebSocket connection: nothing is read after it

def test_7_1_7_after_a_failure_nothing_more_is_read_or_sent():
    messages, parser = parse(frame(0x1, b"\xff") + frame(0x1, b"{}") + frame(0x9, b"ping"))
    assert messages == [] and failed_with(parser, 1007)
    parser.feed(frame(0x1, b"{}"))
    assert parser.next_message() is None and not parser.buffer and len(replies(parser)) == 1


def test_5_5_1_a_bad_close_frame_while_we_close_ends_the_closing_quietly():
    parser = app.FrameParser(LIMIT)
    parser.close(1000)
    parser.outgoing.clear()
    parser.feed(frame(0x8, struct.pack("!H", 5000)))
    assert parser.next_message() is None
    assert parser.state == app.State.CLOSED and not parser.outgoing and parser.error is None


def test_a_close_reason_is_cut_to_whole_characters():
    parser = app.FrameParser(LIMIT)
    parser.close(1000, "é" * 62)  # 124 bytes: one too many
    (opcode, payload), = replies(parser)
    assert len(payload) == 2 + 122 and payload[2:].decode() == "é" * 61


def test_only_one_close_frame_is_ever_sent():
    parser = app.FrameParser(LIMIT)
    parser.close(1000)
    parser.close(1001)
    parser.fail(1002, "late")
    assert [close_code(payload) for _, payload in replies(parser)] == [1000]
    assert parser.error is None, "a failure after our close frame is not the stream's error"
