"""The /media WebSocket end to end: a real server process, a real client, every event."""
import json
import re
import socket
import time
import urllib.error
import urllib.request

import pytest
import websocket  # websocket-client: an independent client implementation

from tests.conftest import run_at_once
from tests.twilio_sim import CHUNK, Call, HandshakeRefused, WSClient, encode_ulaw, frame, tone

SILENCE = b"\xff" * CHUNK


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
    messages = call.session(media=25)
    assert server.stream([*messages, call.dtmf("7"), call.mark("greeting-done"), call.stop()]) == 1000
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "stop"
    assert summary["media"] == "25" and summary["inbound"] == "25/0.50s"
    assert summary["audio"] == "0.50s" and summary["bytes"] == str(25 * CHUNK)
    assert summary["call"] == call.call_sid
    assert (summary["gaps"], summary["duplicates"], summary["out_of_order"]) == ("0",) * 3
    assert (summary["bad"], summary["bad_unknown_mark"]) == ("1", "1"), "a mark echo of a mark we never sent"
    log = server.log()
    sid = call.stream_sid
    assert "connected protocol=Call version=1.0.0" in log
    assert re.search(rf"stream={sid} start call={call.call_sid} tracks=inbound format=audio/x-mulaw/8000/1 "
                     r"params=tenant,secret", log)
    assert "s3cr3t-value" not in log, "parameter values are personal data: debug level only"
    assert f"stream={sid} first media track=inbound: 160 bytes" in log
    assert f"stream={sid} dtmf digit=7" in log
    assert f"stream={sid} skipped message: mark name='greeting-done' was never sent" in log
    assert f"stream={sid} stop" in log
    assert len(re.findall(rf"stream={sid} first media", log)) == 1


def test_an_independent_websocket_client_streams_a_call(server):
    """websocket-client, not our own client: the handshake and framing are really RFC 6455."""
    call = Call()
    ws = websocket.create_connection(server.url, timeout=10)
    for message in call.session(media=50, stop=True):
        ws.send(message)
    opcode, payload = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and payload[:2] == b"\x03\xe8"  # 1000
    ws.close()
    assert server.summary(call.stream_sid)["media"] == "50"


def test_both_tracks_are_counted_apart(server):
    call = Call(tracks=["inbound", "outbound"])
    audio = encode_ulaw(tone(1.0))
    media = call.play({"inbound": audio, "outbound": audio[:4000]})
    assert server.stream([call.connected(), call.start(), *media, call.stop()]) == 1000
    summary = server.summary(call.stream_sid)
    assert summary["media"] == "75"
    assert summary["inbound"] == "50/1.00s" and summary["outbound"] == "25/0.50s"
    assert summary["audio"] == "1.50s" and summary["gaps"] == "0"


def test_drop_without_stop_is_summarized_as_disconnect(server):
    client, call = server.open_call(media=7)
    client.sock.close()  # no stop, no close frame: Twilio's network drop
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "disconnect" and summary["media"] == "7"


def test_bad_input_on_the_socket_is_counted_and_the_call_goes_on(server):
    """Each kind is tested in process (test_stream.py); these are the ones only a socket
    carries, and a mix of the others, through the real server."""
    client, call = server.open_call(media=2)
    client.send(b"\x00\x01binary")
    client.send("")
    client.send("not json")
    client.send(json.dumps({"event": "media", "media": {"track": {}, "payload": "//8="}}))
    client.send(json.dumps({"event": "closed"}))
    client.send_all([call.media("inbound", SILENCE, 60), call.stop()])
    assert client.wait_closed() == 1000
    summary = server.summary(call.stream_sid)
    assert (summary["ended"], summary["media"], summary["bad"]) == ("stop", "3", "5")
    assert (summary["bad_binary"], summary["bad_empty"], summary["bad_invalid_json"], summary["bad_media"],
            summary["bad_unknown_event"]) == ("1",) * 5
    assert len(re.findall(rf"stream={call.stream_sid} skipped message", server.log())) == 4


def test_what_a_client_names_cannot_forge_log_lines(server):
    call = Call(stream_sid="MZforged\n2026-01-01 00:00:00,000 INFO    summary stream=MZfake ended=stop",
                params={"name\rsummary stream=MZfake2": "x"})
    start = json.loads(call.start())
    start["start"]["mediaFormat"]["sampleRate"] = "8000\n2026-01-01 00:00:00,000 INFO    summary stream=MZfake3"
    server.stream([call.connected(), json.dumps(start), call.media("inbound", SILENCE, 20), call.stop()])
    server.wait_for(r"summary stream=MZforged\?2026")
    log = server.log()
    assert not re.search(r"^\S+ \S+ INFO\s+summary stream=MZfake", log, re.MULTILINE)
    assert "params=name?summary stream=MZfake2" in log
    assert "\r" not in log


def test_a_sid_with_spaces_or_equals_signs_cannot_forge_fields_of_the_summary(server):
    call = Call(stream_sid="MZ1 ended=idle stream=MZother", params={"From": "+15550004001"})
    server.stream([*call.session(media=2), call.stop()])
    line = server.wait_for(r"summary stream=MZ1\S* .*").group(0)
    assert line.startswith("summary stream=MZ1?ended?idle?stream?MZother call=") and " ended=stop " in line
    assert "ended=idle" not in line and "stream=MZother" not in line


def test_frames_sent_with_the_handshake_are_all_read(server):
    """A client may send frames before it reads the 101: they sit in the HTTP parser's
    buffer, past the request, and must be read from there before the socket."""
    call = Call()
    frames = b"".join(frame(0x1, m.encode()) for m in call.session(media=60, stop=True))
    request = (f"GET /media HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    assert len(frames) > 4 * 4096
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request + frames)
        sock.shutdown(socket.SHUT_WR)  # no close frame of ours: our EOF ends the closing handshake
        while sock.recv(65536):
            pass
    summary = server.summary(call.stream_sid)
    assert (summary["ended"], summary["media"], summary["bad"]) == ("stop", "60", "0")


def test_a_loose_connection_header_still_streams(server):
    # gevent-websocket upgrades on any Connection header that mentions "upgrade"; once it
    # has answered 101 the stream must be handled, not dropped.
    call = Call()
    assert server.stream(call.session(media=3, stop=True), Connection="keep-alive Upgrade") == 1000
    assert server.summary(call.stream_sid)["media"] == "3"


def test_unexpected_media_format_is_warned(server):
    call = Call()
    start = json.loads(call.start())
    start["start"]["mediaFormat"] = {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}
    server.stream([call.connected(), json.dumps(start), call.stop()])
    assert re.search(rf"stream={call.stream_sid} unexpected media format audio/x-l16/16000/1", server.log())


def test_fragmented_messages_and_pings_are_handled(server):
    client, call = server.open_call(media=1)
    data = call.media("inbound", SILENCE, 40).encode()
    client.send_raw(frame(0x1, data[:50], fin=False) + frame(0x9, b"hi")  # a ping between the fragments
                    + frame(0x0, data[50:100], fin=False) + frame(0x0, data[100:]))
    assert client.recv_frame() == (0xA, b"hi")
    client.send(call.stop())
    assert server.ending(client, call) == (1000, "stop", "2")


def test_a_message_in_many_small_tcp_pieces_is_read_whole(server):
    call = Call()
    client = server.connect()
    data = b"".join(frame(0x1, m.encode()) for m in call.session(media=5, stop=True))
    for i in range(0, len(data), 7):
        client.send_raw(data[i:i + 7])
    assert server.ending(client, call) == (1000, "stop", "5")


def test_numbers_may_come_as_json_numbers(server):
    call = Call()
    message = json.loads(call.media("inbound", SILENCE, 20))
    message["sequenceNumber"] = int(message["sequenceNumber"])
    message["media"].update(timestamp=20, chunk=1)
    server.stream([*call.session(), json.dumps(message), call.stop()])
    assert server.summary(call.stream_sid)["media"] == "1"


def test_websocket_upgrade_on_an_unknown_path_is_refused_before_101(server):
    with pytest.raises(HandshakeRefused) as refused:
        WSClient(server.url.replace("/media", "/other"))
    assert refused.value.status == 404


def test_twenty_concurrent_calls_each_get_their_own_exact_counts(server):
    calls = [Call(tracks=["inbound", "outbound"] if i % 2 else ["inbound"]) for i in range(20)]

    def play(i, call):
        client = server.connect()
        client.send_all(call.session())
        for n in range(40 + i):
            if i % 3 == 0 and n == 10:
                client.send("not json")  # bad input on some calls must not touch the others
            client.send_all(call.media(track, SILENCE, 20 * (n + 1)) for track in call.tracks)
        client.send(call.stop())
        assert client.wait_closed() == 1000

    assert not run_at_once(play, calls)
    for i, call in enumerate(calls):
        summary = server.summary(call.stream_sid)
        assert summary["ended"] == "stop"
        assert summary["media"] == str((40 + i) * len(call.tracks))
        assert summary["inbound"] == f"{40 + i}/{(40 + i) * 0.02:.2f}s"
        assert summary["bad"] == ("1" if i % 3 == 0 else "0")


def test_streams_read_in_batches_while_the_process_is_behind_are_still_counted_exactly(start_server):
    # While the event loop runs late each stream is read every --read-interval-ms: frames
    # split across reads, bad input and stops must come through that path as one by one.
    server = start_server("--read-interval-ms", "150", server="blocking")
    calls = [Call(stream_sid=f"MZ{n:031x}1") for n in range(59)] + [Call(stream_sid="MZ" + "0" * 32)]
    clients = [server.connect() for _ in calls]
    for call, client in zip(calls, clients):
        client.send_all(call.session())
    server.wait_for(r" start call=", count=60)
    server.wait_for(r"event loop \d+ ms late with 60 streams open: this process cannot keep up; reading "
                    r"listen-only streams every 150 ms")
    frame_held = {}
    for n in range(25):
        for i, (call, client) in enumerate(zip(calls, clients)):
            media = frame(0x1, call.media("inbound", SILENCE, 20 * (n + 1)).encode())
            if i % 4 == 0 and n == 5:
                client.send_raw(media[:7])  # the rest comes with the next message
                frame_held[i] = media[7:]
            elif i % 4 == 0 and n == 6:
                client.send_raw(frame_held.pop(i) + frame(0x1, b"not json") + media)
            else:
                client.send_raw(media)
        time.sleep(0.02)  # paced as calls send: split frames straddle the server's reads
    for call, client in zip(calls, clients):
        client.send(call.stop())
    assert [client.wait_closed() for client in clients] == [1000] * 60, "every stream is closed after its stop"
    for i, call in enumerate(calls):
        summary = server.summary(call.stream_sid)
        assert (summary["ended"], summary["media"], summary["bad"]) == ("stop", "25", "1" if i % 4 == 0 else "0")
    assert "error" not in server.log() and "Traceback" not in server.log()
