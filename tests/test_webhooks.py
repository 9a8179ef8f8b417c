"""Twilio's side of the call, served by the app: /twiml (the voice webhook: the TwiML for
how the server runs) and /stream-status (the stream status callback), signed as Twilio signs
webhooks. twilio-python is the oracle: RequestValidator signs, an XML parser reads."""
import http.client
import re
import socket
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import MultiDict

import app
from tests.conftest import ROOT, clean_environment, free_port
from tests.twilio_sim import Call, encode_ulaw, tone

TOKEN = "0123456789abcdef0123456789abcdef"
WEBHOOK = {"AccountSid": "AC" + "0" * 32, "CallSid": "CA" + "1" * 32, "From": "+15550051", "To": "+15550052",
           "Direction": "inbound", "CallStatus": "ringing"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def post(port, path, fields, headers=None, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    pairs = list(fields.items(multi=True)) if isinstance(fields, MultiDict) else fields
    connection.request("POST", path, body=body if body is not None else urlencode(pairs),
                       headers={**FORM, **(headers or {})})
    response = connection.getresponse()
    return response.status, response.read().decode("utf-8", "replace")


def signed(port, path, fields, host=None, token=TOKEN):
    """X-Twilio-Signature as Twilio computes it for https://<host><path> and these fields."""
    url = f"https://{host or f'127.0.0.1:{port}'}{path}"
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, fields)}


def stream_of(twiml):
    """(the verb the <Stream> is in, the <Stream>, its parameters, the verbs that follow)."""
    response = ElementTree.fromstring(twiml)
    assert response.tag == "Response"
    verb = response[0]
    stream, = verb
    parameters = {p.get("name"): p.get("value") for p in stream if p.tag == "Parameter"}
    return verb.tag, stream, parameters, [child.tag for child in response[1:]]


def test_listening_twiml_starts_a_stream_here_with_the_callers_fields_and_keeps_the_call_up(start_server):
    server = start_server()
    status, twiml = post(server.port, "/twiml", WEBHOOK)
    assert status == 200
    verb, stream, parameters, after = stream_of(twiml)
    assert (verb, stream.get("url"), stream.get("track")) == ("Start", f"wss://127.0.0.1:{server.port}/media",
                                                                "inbound_track")
    assert stream.get("statusCallback") == f"https://127.0.0.1:{server.port}/stream-status"
    assert parameters == {name: WEBHOOK[name] for name in ("From", "To", "CallSid", "Direction")}
    assert after == ["Say", "Pause"] and ElementTree.fromstring(twiml)[2].get("length") == "3600"
    assert f"twiml call={WEBHOOK['CallSid']} from=given: <Start><Stream> to wss://127.0.0.1:{server.port}/media" \
        in server.wait_for("twiml call=.*").group(0)


@pytest.mark.parametrize("flags, verb, track, after", [
    (["--dial", "+15551234567"], "Start", "inbound_track", ["Dial"]),
    (["--dial", "sip:agent@pbx.example.com;transport=tcp"], "Start", "inbound_track", ["Dial"]),
    (["--tracks", "both"], "Start", "both_tracks", ["Say", "Pause"]),
    (["--tracks", "outbound", "--public-url", "https://media.example.com"], "Start", "outbound_track", ["Say", "Pause"]),
    (["--echo"], "Connect", None, []),  # nothing after <Connect>: the call ends as the stream closes
])
def test_each_mode_has_its_twiml(start_server, flags, verb, track, after):
    server = start_server(*flags)
    status, twiml = post(server.port, "/twiml", WEBHOOK)
    assert status == 200
    got_verb, stream, parameters, got_after = stream_of(twiml)
    assert (got_verb, stream.get("track"), got_after) == (verb, track, after)
    host = "media.example.com" if "--public-url" in flags else f"127.0.0.1:{server.port}"
    assert stream.get("url") == f"wss://{host}/media"
    if "--dial" in flags:  # a number as the text of <Dial>, a SIP URI only inside <Sip>: Twilio dials nothing else
        dial = ElementTree.fromstring(twiml)[1]
        if flags[1].startswith("sip:"):
            assert [(sip.tag, sip.text) for sip in dial] == [("Sip", flags[1])] and not (dial.text or "").strip()
        else:
            assert dial.text == flags[1] and len(dial) == 0


def test_every_value_is_a_value_never_markup_and_get_works_too(start_server):
    server = start_server()
    hostile = {**WEBHOOK, "From": '+1555"/><Hangup/>', "To": "<Reject/>&amp;"}
    status, twiml = post(server.port, "/twiml", hostile)
    assert status == 200 and "<Hangup" not in twiml and "<Reject" not in twiml
    _, _, parameters, after = stream_of(twiml)
    assert (parameters["From"], parameters["To"]) == ('+1555"/><Hangup/>', "<Reject/>&amp;")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/twiml?" + urlencode({"From": "+15550053", "CallSid": "CA9"}))
    response = connection.getresponse()
    _, _, parameters, _ = stream_of(response.read().decode())
    assert response.status == 200 and parameters == {"From": "+15550053", "CallSid": "CA9"}, "missing fields: left out"


def test_with_a_token_only_what_twilio_signed_gets_twiml(start_server):
    server = start_server(env={"TWILIO_AUTH_TOKEN": TOKEN})
    assert post(server.port, "/twiml", WEBHOOK, signed(server.port, "/twiml", WEBHOOK))[0] == 200
    without_port = signed(server.port, "/twiml", WEBHOOK, host="127.0.0.1")  # Twilio's signer may drop the port
    assert post(server.port, "/twiml", WEBHOOK, without_port)[0] == 200
    repeated = MultiDict([*WEBHOOK.items(), ("Digits", "2"), ("Digits", "1")])  # each value signed, sorted
    assert post(server.port, "/twiml", repeated, signed(server.port, "/twiml", repeated))[0] == 200
    for headers in ({}, signed(server.port, "/twiml", WEBHOOK, token="another-token"),
                    signed(server.port, "/twiml", {**WEBHOOK, "From": "+15550099"})):
        status, body = post(server.port, "/twiml", WEBHOOK, headers)
        assert (status, "<Response" in body) == (403, False)
    lines = re.findall(r"refused webhook remote=127.0.0.1 path=/twiml status=403 reason=(.*)", server.log())
    assert lines == ["no X-Twilio-Signature", "a wrong X-Twilio-Signature", "a wrong X-Twilio-Signature"]
    assert TOKEN not in server.log()


def test_stream_status_callbacks_are_a_line_a_count_and_part_of_the_summary_of_a_stream_open_here(start_server):
    metrics_port = free_port()
    server = start_server("--metrics-port", str(metrics_port), env={"TWILIO_AUTH_TOKEN": TOKEN})
    call = Call()
    client = server.connect(**{"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(
        f"wss://127.0.0.1:{server.port}/media", {})})
    client.send_all(call.session(media=3))
    server.wait_for(rf"stream={call.stream_sid} first media")
    started = {"StreamSid": call.stream_sid, "CallSid": call.call_sid, "StreamEvent": "stream-started",
               "StreamName": call.stream_sid, "Timestamp": "2026-12-03T07:00:00Z", "AccountSid": WEBHOOK["AccountSid"]}
    assert post(server.port, "/stream-status", started, signed(server.port, "/stream-status", started))[0] == 204
    never = {"StreamSid": "MZ" + "9" * 32, "CallSid": "CA" + "9" * 32, "StreamEvent": "stream-error",
             "StreamError": "Stream - WebSocket - Connection Refused", "Timestamp": "2026-12-03T07:00:01Z"}
    assert post(server.port, "/stream-status", never, signed(server.port, "/stream-status", never))[0] == 204
    assert post(server.port, "/stream-status", never)[0] == 403, "signed as every webhook"
    client.send_all([call.stop()])
    assert client.wait_closed() == 1000
    assert server.summary(call.stream_sid)["status"] == "stream-started"
    log = server.log()
    assert f"INFO    stream={call.stream_sid} status event=stream-started call={call.call_sid}" in log
    assert f'WARNING stream={never["StreamSid"]} status event=stream-error call={never["CallSid"]} ' \
           'error="Stream - WebSocket - Connection Refused"' in log
    connection = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
    connection.request("GET", "/metrics")
    scraped = connection.getresponse().read().decode()
    assert 'mediastreams_stream_status_total{event="stream-started"} 1.0' in scraped
    assert 'mediastreams_stream_status_total{event="stream-error"} 1.0' in scraped


@pytest.mark.parametrize("path, body, headers, says", [
    ("/twiml", b"x" * 20000, FORM, "status=400 reason=a body of 20000 bytes (a webhook's may have 16384)"),
    ("/twiml", b"&".join(b"f%d=1" % n for n in range(1500)), FORM,
     "status=400 reason=a body of 1500 fields (Twilio's have fewer than 100)"),
    ("/twiml", b'{"From": "+1555"}', {"Content-Type": "application/json"}, "status=415 reason=not a form"),
    ("/healthz", b"a=b", FORM, "status=400 reason=a request body (only a POST to /twiml or /stream-status has one)"),
    ("/twiml", b"From=%FF%FE&CallSid=\xff", FORM, None),  # not UTF-8: replaced, not a traceback
])
def test_a_bad_body_is_a_4xx_and_one_short_line_never_a_traceback(start_server, path, body, headers, says):
    server = start_server()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", path, body=body, headers=headers)
    status = connection.getresponse().status
    assert status == (200 if says is None else int(re.search(r"status=(\d+)", says).group(1)))
    if says:
        server.wait_for(re.escape(says))
    assert "Traceback" not in server.log()


def test_a_body_sent_chunked_or_never_is_refused_within_the_handshake_timeout(start_server):
    server = start_server("--handshake-timeout", "1")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", "/twiml", body=iter([b"From=1"]), headers={**FORM, "Transfer-Encoding": "chunked"})
    assert connection.getresponse().status == 400
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # 100 bytes promised, 10 sent
        sock.sendall(b"POST /twiml HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 100\r\n\r\nFrom=+1555")
        sock.settimeout(5)
        answer = sock.recv(100)  # within 5 s, closed (or answered): held longer, this raises a timeout
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
    server.wait_for(r"no complete HTTP request within 1 s")
    assert "Traceback" not in server.log()


def simulator(*args, token=None):
    done = subprocess.run([sys.executable, "-m", "tests.twilio_sim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=clean_environment({"TWILIO_AUTH_TOKEN": token} if token else {}))
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("flags, verb", [([], "Start"), (["--echo"], "Connect")])
def test_the_simulator_plays_the_whole_twilio_side_signed(start_server, flags, verb):
    server = start_server(*flags, env={"TWILIO_AUTH_TOKEN": TOKEN})
    code, out, err = simulator("--twiml", f"http://127.0.0.1:{server.port}/twiml", "--seconds", "1", "--from",
                               "+15550061", token=TOKEN)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f"twiml <{verb}><Stream> url=wss://127.0.0.1:{server.port}/media track=inbound "
                        f"parameters=From,To,CallSid,Direction statusCallback=https://127.0.0.1:{server.port}/stream-status")
    assert lines[1] == "status stream-started 204" and lines[-1] == "status stream-stopped 204"
    sid = re.search(r"sent stream=(MZ\w+) media=50 ", out).group(1)
    summary = server.summary(sid)
    assert (summary["ended"], summary["media"], summary["status"]) == ("stop", "50", "stream-started")
    server.wait_for(rf"stream={sid} status event=stream-stopped")
    assert re.search(rf"stream={sid} start call=CA\w+ .* params=From,To,CallSid,Direction", server.log())
    assert "refused" not in server.log(), "every request signed as Twilio signs it"
    code, _, err = simulator("--twiml", f"http://127.0.0.1:{server.port}/twiml", "--seconds", "1", token="not-it")
    assert code == 1 and "the voice webhook" in err and "answered 403" in err


def test_the_simulator_signs_its_handshake(start_server):
    server = start_server(env={"TWILIO_AUTH_TOKEN": TOKEN})
    url = f"ws://127.0.0.1:{server.port}/media"
    assert simulator(url, "--seconds", "0.2", token=TOKEN)[0] == 0
    assert simulator(url, "--seconds", "0.2", "--auth-token", TOKEN)[0] == 0
    code, _, err = simulator(url, "--seconds", "0.2", token="not-it")
    assert code == 1 and "403" in err


def test_a_stream_that_hangs_up_ends_its_call_from_the_server_side(start_server):
    from tests.twilio_sim import play_connect_call
    server = start_server(server="hangs-up")
    url = f"ws://127.0.0.1:{server.port}/media"
    player, code, call = play_connect_call(url, tone(3.0), dtmf="9", out=lambda line: None)
    assert code == 1000 and player.ending is None
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "hangup" and int(summary["media"]) < 100, "at the key, not at the end of the audio"
    by_audio = Call(tracks=["inbound"])
    by_audio.call_sid = "CA" + "0" * 27 + "audio"  # HangsUp hangs up a second into this one's audio, from on_audio()
    client = server.connect()
    client.send_all(by_audio.session(audio={"inbound": encode_ulaw(tone(3.0))}))
    assert client.wait_closed() == 1000
    assert server.summary(by_audio.stream_sid)["ended"] == "hangup"
    assert "Traceback" not in server.log() and "failed with HangUp" not in server.log()


class CountedFields(list):
    """A webhook's fields that count how many times they are gone through."""
    passes = 0

    def __iter__(self):
        CountedFields.passes += 1
        return super().__iter__()


def test_a_signature_goes_through_the_fields_once_whatever_their_number_and_matches_twilios():
    """An unsigned POST with many fields cost O(fields^2) for each of 3 candidate URLs before it
    was refused (issue 37: 1,000 fields 114-135 ms in the event loop). Counted, not timed."""
    fields = CountedFields([(f"f{n % 40}", str(n)) for n in range(99)] + [("From", "+1555"), ("From", "+1444")])
    expected = RequestValidator(TOKEN).compute_signature("https://example.com/twiml", MultiDict(list(fields)))
    CountedFields.passes = 0
    assert app.twilio_signature(TOKEN, "https://example.com/twiml", fields) == expected
    assert app.signature_is_valid(TOKEN, "example.com:443", "/twiml", expected, "https", fields)
    assert CountedFields.passes == 2, "once for the signature, once for the three candidate URLs together"

