"""The /media WebSocket end to end: a real server process, a real client, every event."""
import json
import re
import signal
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest
import websocket  # websocket-client: an independent client implementation

from tests.conftest import run_at_once
from tests.twilio_sim import CHUNK, Call, WSClient, encode_ulaw, tone

SILENCE = b"\xff" * CHUNK


def play(server, messages, call=None, stop=True):
    """Send messages on a fresh connection (and `stop`), wait for the server to close."""
    client = server.connect()
    for message in messages:
        client.send(message)
    if stop and call is not None:
        client.send(call.stop())
        assert client.wait_closed(), "the server should close the socket after stop"
    client.sock.close()


def session(call, media=10, track="inbound"):
    """connected, start and `media` media messages of one track."""
    return [call.connected(), call.start(),
            *(call.media(track, SILENCE, 20 * (i + 1)) for i in range(media))]


def test_home_page_says_where_the_websocket_is(server):
    with urllib.request.urlopen(server.http_url + "/") as response:
        body = response.read().decode()
    assert response.status == 200
    assert body.count("\n") == 1 and f"wss://127.0.0.1:{server.port}/media" in body


def test_plain_http_get_on_media_gets_a_hint_not_a_500(server):
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server.http_url + "/media")
    assert error.value.code == 426
    assert "WebSocket endpoint" in error.value.read().decode()
    assert "Traceback" not in server.log()


def test_full_session_logs_every_event_and_exact_counts(server):
    call = Call(params={"tenant": "demo", "secret": "s3cr3t-value"})
    client = WSClient(server.url)
    for message in session(call, media=25):
        client.send(message)
    client.send(call.dtmf("7"))
    client.send(call.mark("greeting-done"))
    client.send(call.stop())
    assert client.wait_closed()
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "stop"
    assert summary["media"] == "25" and summary["inbound"] == "25/0.50s"
    assert summary["audio"] == "0.50s" and summary["bytes"] == str(25 * CHUNK)
    assert summary["call"] == call.call_sid
    assert (summary["gaps"], summary["duplicates"], summary["out_of_order"], summary["bad"]) == ("0",) * 4
    log = server.log()
    sid = call.stream_sid
    assert "connected protocol=Call version=1.0.0" in log
    assert re.search(rf"stream={sid} start call={call.call_sid} tracks=inbound format=audio/x-mulaw/8000/1 "
                     r"params=tenant,secret", log)
    assert "s3cr3t-value" not in log, "parameter values are personal data: debug level only"
    assert f"stream={sid} first media track=inbound: 160 bytes" in log
    assert f"stream={sid} dtmf digit=7" in log
    assert f"stream={sid} mark name='greeting-done'" in log
    assert f"stream={sid} stop" in log
    assert len(re.findall(rf"stream={sid} first media", log)) == 1


def test_an_independent_websocket_client_streams_a_call(server):
    """websocket-client, not our own client: the handshake and framing are really RFC 6455."""
    call = Call()
    ws = websocket.create_connection(server.url, timeout=10)
    for message in session(call, media=50):
        ws.send(message)
    ws.send(call.stop())
    assert ws.recv_data()[0] == websocket.ABNF.OPCODE_CLOSE
    ws.close()
    assert server.summary(call.stream_sid)["media"] == "50"


def test_both_tracks_are_counted_apart(server):
    call = Call(tracks=["inbound", "outbound"])
    audio = encode_ulaw(tone(1.0))
    play(server, [call.connected(), call.start(), *call.play({"inbound": audio, "outbound": audio[:4000]})], call)
    summary = server.summary(call.stream_sid)
    assert summary["media"] == "75"
    assert summary["inbound"] == "50/1.00s" and summary["outbound"] == "25/0.50s"
    assert summary["audio"] == "1.50s" and summary["gaps"] == "0"


def test_drop_without_stop_is_summarized_as_disconnect(server):
    call = Call()
    client = server.connect()
    for message in session(call, media=7):
        client.send(message)
    client.sock.close()  # no stop, no close frame: Twilio's network drop
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "disconnect" and summary["media"] == "7"


def test_a_close_frame_without_stop_is_a_disconnect_too(server):
    call = Call()
    client = server.connect()
    for message in session(call, media=3):
        client.send(message)
    client.close()
    assert server.summary(call.stream_sid)["ended"] == "disconnect"


def test_closed_is_not_an_event_but_unknown_events_are_logged_once_per_name(server):
    call = Call()
    weird = [json.dumps({"event": "closed"}), json.dumps({"event": "closed"}), json.dumps({"event": "x-new"})]
    play(server, [*session(call, media=2), *weird, call.media("inbound", SILENCE, 60)], call)
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "stop" and summary["media"] == "3"
    assert summary["bad_unknown_event"] == "3"
    log = server.log()
    assert log.count(f"stream={call.stream_sid} unknown event 'closed': ignored") == 1
    assert log.count(f"stream={call.stream_sid} unknown event 'x-new': ignored") == 1


BAD_INPUTS = {
    "invalid_json": lambda call: '{"event": "media", ',
    "not_object": lambda call: "[1, 2, 3]",
    "no_event": lambda call: json.dumps({"streamSid": call.stream_sid}),
    "no_event_type": lambda call: json.dumps({"event": 42}),
    "bad_media": lambda call: json.dumps({"event": "media", "media": "not an object"}),
    "bad_track": lambda call: json.dumps({"event": "media", "media": {"track": 1, "payload": "//8="}}),
    "missing_payload": lambda call: json.dumps({"event": "media", "media": {"track": "inbound"}}),
    "payload_type": lambda call: json.dumps({"event": "media", "media": {"track": "inbound", "payload": 5}}),
    "bad_base64": lambda call: json.dumps({"event": "media", "media": {"track": "inbound", "payload": "!!notb64"}}),
    "bad_timestamp": lambda call: json.dumps({"event": "media", "media": {
        "track": "inbound", "payload": "//8=", "timestamp": "soon"}}),
    "bad_sequence": lambda call: json.dumps({"event": "dtmf", "sequenceNumber": [1], "dtmf": {"digit": "1"}}),
    "bad_dtmf": lambda call: json.dumps({"event": "dtmf", "dtmf": None}),
    "bad_mark": lambda call: json.dumps({"event": "mark", "mark": {"name": 3}}),
    "empty": lambda call: "",
    "binary": lambda call: b"\x00\x01binary",
    "deep_json": lambda call: "[" * 30000 + "]" * 30000,
    "second_connected": lambda call: call.connected(),
    "huge_timestamp": lambda call: json.dumps({"event": "media", "media": {
        "track": "inbound", "payload": "//8=", "timestamp": "9" * 4300}}),
}
EXPECTED_KIND = {"no_event_type": "no_event", "bad_track": "bad_media", "missing_payload": "bad_payload",
                 "payload_type": "bad_payload", "bad_base64": "bad_payload", "bad_sequence": "bad_sequenceNumber",
                 "deep_json": "invalid_json", "huge_timestamp": "bad_timestamp"}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_named_counted_and_survived(server, name):
    call = Call()
    bad = BAD_INPUTS[name](call)
    messages = [call.connected(), call.start(), call.media("inbound", SILENCE, 20), bad,
                *(call.media("inbound", SILENCE, 20 * (i + 2)) for i in range(5))]
    play(server, messages, call)
    summary = server.summary(call.stream_sid)
    kind = EXPECTED_KIND.get(name, name)
    assert summary["ended"] == "stop"
    assert summary["media"] == "6", "every good message around the bad one is counted"
    assert summary["bad"] == "1" and summary[f"bad_{kind}"] == "1"
    warnings = [line for line in server.log().splitlines()
                if f"stream={call.stream_sid} skipped message" in line]
    assert len(warnings) == 1 and len(warnings[0]) < 300, warnings


def test_what_a_client_names_cannot_forge_log_lines(server):
    call = Call(stream_sid="MZforged\n2026-01-01 00:00:00,000 INFO    summary stream=MZfake ended=stop",
                params={"name\rsummary stream=MZfake2": "x"})
    start = json.loads(call.start())
    start["start"]["mediaFormat"]["sampleRate"] = "8000\n2026-01-01 00:00:00,000 INFO    summary stream=MZfake3"
    play(server, [call.connected(), json.dumps(start), call.media("inbound", SILENCE, 20)], call)
    server.wait_for(r"summary stream=MZforged\?2026")
    log = server.log()
    assert not re.search(r"^\S+ \S+ INFO\s+summary stream=MZfake", log, re.MULTILINE)
    assert "params=name?summary stream=MZfake2" in log
    assert "\r" not in log


def test_frames_sent_with_the_handshake_are_all_read(server):
    """A client may send frames before it reads the 101: they sit in the HTTP parser's
    buffer, past the request, and must be read from there before the socket."""
    call = Call()
    frames = b"".join(WSClient.frame(0x1, m.encode()) for m in [*session(call, media=60), call.stop()])
    request = (f"GET /media HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    assert len(frames) > 4 * 4096
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request + frames)
        while sock.recv(65536):
            pass
    summary = server.summary(call.stream_sid)
    assert (summary["ended"], summary["media"], summary["bad"]) == ("stop", "60", "0")


def test_a_loose_connection_header_still_streams(server):
    # gevent-websocket upgrades on any Connection header that mentions "upgrade"; once it
    # has answered 101 the stream must be handled, not dropped.
    call = Call()
    client = server.connect(Connection="keep-alive Upgrade")
    for message in session(call, media=3):
        client.send(message)
    client.send(call.stop())
    assert client.wait_closed()
    assert server.summary(call.stream_sid)["media"] == "3"


def test_media_before_start_is_dropped_with_a_warning(server):
    call = Call()
    client = server.connect()
    client.send(call.connected())
    client.send(call.media("inbound", SILENCE, 0))
    for message in session(call, media=4)[1:]:
        client.send(message)
    client.send(call.stop())
    client.wait_closed()
    summary = server.summary(call.stream_sid)
    assert summary["media"] == "4" and summary["bad_media_before_start"] == "1"
    assert re.search(r"remote=127.0.0.1 skipped message: media before 'start'", server.log())


def test_gaps_duplicates_and_out_of_order_are_counted(server):
    call = Call()
    first = session(call, media=3)  # sequence 1..3 (start is 1), timestamps 20, 40, 60
    duplicate = first[-1]
    skipped = call.media("inbound", SILENCE, 80)  # never sent: a 20 ms gap
    late = [call.media("inbound", SILENCE, 100 + 20 * i) for i in range(3)]
    out_of_order = skipped
    play(server, [*first, duplicate, late[0], late[1], out_of_order, late[2]], call)
    summary = server.summary(call.stream_sid)
    assert summary["media"] == "7"  # 3 + 3 + the late one, not the duplicate
    assert summary["duplicates"] == "1" and summary["out_of_order"] == "1"
    assert summary["gaps"] == "1"
    assert re.search(rf"stream={call.stream_sid} gap track=inbound: 20 ms of audio missing", server.log())


def test_unexpected_media_format_is_warned(server):
    call = Call()
    start = json.loads(call.start())
    start["start"]["mediaFormat"] = {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}
    play(server, [call.connected(), json.dumps(start)], call)
    assert re.search(rf"stream={call.stream_sid} unexpected media format audio/x-l16/16000/1", server.log())


def test_invalid_utf8_ends_the_stream_with_a_summary(server):
    call = Call()
    client = server.connect()
    for message in session(call, media=4):
        client.send(message)
    client.send_raw(WSClient.frame(0x1, b'{"event": "\xff\xfe"}'))
    assert client.wait_closed()
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "error" and summary["media"] == "4"
    assert f"stream={call.stream_sid} invalid UTF-8" in server.log()


def test_protocol_error_ends_the_stream_with_a_summary(server):
    call = Call()
    client = server.connect()
    for message in session(call, media=2):
        client.send(message)
    client.send_raw(WSClient.frame(0x1, b"{}", rsv=0x40))  # reserved bit, no extension agreed
    assert client.wait_closed()
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "error" and summary["media"] == "2"
    assert re.search(rf"stream={call.stream_sid} WebSocket protocol error", server.log())


def test_fragmented_messages_and_pings_are_handled(server):
    call = Call()
    client = server.connect()
    for message in session(call, media=1):
        client.send(message)
    data = call.media("inbound", SILENCE, 40).encode()
    client.send_raw(WSClient.frame(0x1, data[:50], fin=False))
    client.send_raw(WSClient.frame(0x9, b"hi"))  # a ping between the fragments
    client.send_raw(WSClient.frame(0x0, data[50:100], fin=False))
    client.send_raw(WSClient.frame(0x0, data[100:]))
    assert client.recv_frame() == (0xA, b"hi")
    client.send(call.stop())
    client.wait_closed()
    assert server.summary(call.stream_sid)["media"] == "2"


def test_twenty_concurrent_calls_each_get_their_own_exact_counts(server):
    calls = [Call(tracks=["inbound", "outbound"] if i % 2 else ["inbound"]) for i in range(20)]

    def play(i, call):
        client = server.connect()
        client.send(call.connected())
        client.send(call.start())
        for n in range(40 + i):
            if i % 3 == 0 and n == 10:
                client.send("not json")  # bad input on some calls must not touch the others
            for track in call.tracks:
                client.send(call.media(track, SILENCE, 20 * (n + 1)))
            if n % 10 == 0:
                time.sleep(0.01)
        client.send(call.stop())
        client.wait_closed()

    assert not run_at_once(play, calls)
    for i, call in enumerate(calls):
        summary = server.summary(call.stream_sid)
        assert summary["ended"] == "stop"
        assert summary["media"] == str((40 + i) * len(call.tracks))
        assert summary["inbound"] == f"{40 + i}/{(40 + i) * 0.02:.2f}s"
        assert summary["bad"] == ("1" if i % 3 == 0 else "0")


def test_over_fifty_streams_are_read_in_batches_and_still_counted_exactly(start_server):
    # Above 50 open streams each is read every --read-interval-ms: frames split across
    # reads, bad input and stops must come through that path as they do one by one.
    server = start_server("--read-interval-ms", "150")
    calls = [Call() for _ in range(60)]
    clients = [server.connect() for _ in calls]
    for call, client in zip(calls, clients):
        client.send(call.connected())
        client.send(call.start())
    frame_held = {}
    for n in range(25):
        for i, (call, client) in enumerate(zip(calls, clients)):
            frame = WSClient.frame(0x1, call.media("inbound", SILENCE, 20 * (n + 1)).encode())
            if i % 4 == 0 and n == 5:
                client.send_raw(frame[:7])  # the rest comes with the next message
                frame_held[i] = frame[7:]
            elif i % 4 == 0 and n == 6:
                client.send_raw(frame_held.pop(i) + WSClient.frame(0x1, b"not json") + frame)
            else:
                client.send_raw(frame)
        time.sleep(0.02)
    for call, client in zip(calls, clients):
        client.send(call.stop())
    for client in clients:
        assert client.wait_closed(), "every stream is closed after its stop"
    for i, call in enumerate(calls):
        summary = server.summary(call.stream_sid)
        assert (summary["ended"], summary["media"], summary["bad"]) == ("stop", "25", "1" if i % 4 == 0 else "0")
    assert "error" not in server.log() and "Traceback" not in server.log()


def test_sigterm_summarizes_open_streams_and_exits_quickly(start_server):
    server = start_server()
    calls = [Call() for _ in range(3)]
    clients = []
    for call in calls:
        client = server.connect()
        for message in session(call, media=5):
            client.send(message)
        clients.append(client)
    server.wait_for(r"first media", count=3)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(5)
    assert time.monotonic() - started < 5
    for call in calls:
        summary = server.summary(call.stream_sid, timeout=0)
        assert summary["ended"] == "shutdown" and summary["media"] == "5"
    for client in clients:
        assert client.wait_closed(2)


def test_ctrl_c_stops_the_server_too(start_server):
    server = start_server()
    call = Call()
    client = server.connect()
    for message in session(call, media=2):
        client.send(message)
    server.wait_for("first media")
    server.process.send_signal(signal.SIGINT)
    server.process.wait(5)
    assert server.summary(call.stream_sid, timeout=0)["ended"] == "shutdown"
    assert "Traceback" not in server.log()


def test_websocket_upgrade_on_an_unknown_path_is_refused_before_101(server):
    with pytest.raises(Exception) as refused:
        WSClient(server.url.replace("/media", "/other"))
    assert refused.value.status == 404


def test_binary_frame_message_length_matches_a_tcp_split(server):
    """A message arriving in many small TCP pieces is read whole."""
    call = Call()
    client = server.connect()
    data = b"".join(WSClient.frame(0x1, m.encode()) for m in session(call, media=5))
    for i in range(0, len(data), 7):
        client.send_raw(data[i:i + 7])
        if i % 70 == 0:
            time.sleep(0.001)
    client.send(call.stop())
    client.wait_closed()
    assert server.summary(call.stream_sid)["media"] == "5"


def test_numbers_may_come_as_json_numbers(server):
    call = Call()
    start = call.start()
    message = json.loads(call.media("inbound", SILENCE, 20))
    message["sequenceNumber"] = int(message["sequenceNumber"])
    message["media"]["timestamp"] = 20
    message["media"]["chunk"] = 1
    play(server, [call.connected(), start, json.dumps(message)], call)
    assert server.summary(call.stream_sid)["media"] == "1"


def test_max_warnings_per_stream_are_capped_but_all_counted(server):
    call = Call()
    play(server, [call.connected(), call.start(), *["nope"] * 150, call.media("inbound", SILENCE, 20)], call)
    summary = server.summary(call.stream_sid)
    assert summary["bad_invalid_json"] == "150" and summary["media"] == "1"
    assert server.log().count(f"stream={call.stream_sid} skipped message") == 100
    assert f"stream={call.stream_sid} more than 100 warnings" in server.log()


def test_frame_struct_helper_roundtrip():
    """The test client's own framing, checked against the RFC's example (section 5.7)."""
    assert WSClient.frame(0x1, b"Hello", mask=b"\x37\xfa\x21\x3d") == bytes.fromhex("818537fa213d7f9f4d5158")
    assert struct.unpack("!H", WSClient.frame(0x2, b"x" * 256, mask=b"\0\0\0\0")[2:4])[0] == 256
