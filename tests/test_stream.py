"""MediaStream in process, without a socket: every event through handle(), every kind of
bad message, the event table a subclass extends, the audio hook."""
import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app
from tests.conftest import SentMessages, runtime
from tests.twilio_sim import CHUNK, Call, encode_ulaw, tone

SILENCE = b"\xff" * CHUNK


RUNTIME = runtime()
RUNTIME.stream_warnings.per_second = 10 ** 9  # the fuzz test would spend a real budget of warning lines


def handled(messages, stream_class=app.MediaStream):
    stream = stream_class(RUNTIME, remote="test")
    for message in messages:
        stream.handle(message)
    return stream


def summary(stream):
    return stream.summary().fields()


@pytest.fixture
def warnings(caplog):
    """The warning lines logged so far."""
    caplog.set_level(logging.INFO, logger="mediastreams")
    return lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_handle_returns_each_event_and_counts_the_call():
    call = Call()
    stream = app.MediaStream(RUNTIME, remote="test", ws=SentMessages())
    events = [stream.handle(m) for m in call.session(media=3)]
    stream.mark("m")
    events += [stream.handle(m) for m in [call.dtmf("5"), call.mark("m"), call.stop()]]
    assert events == ["connected", "start", "media", "media", "media", "dtmf", "mark", "stop"]
    fields = summary(stream)
    assert (fields["stream"], fields["call"], fields["ended"]) == (call.stream_sid, call.call_sid, "stop")
    assert (fields["media"], fields["inbound"], fields["bytes"], fields["bad"]) == ("3", "3/0.06s", "480", "0")


BAD_INPUTS = {
    "invalid_json": lambda call: '{"event": "media", ',
    "not_object": lambda call: "[1, 2, 3]",
    "no_event": lambda call: json.dumps({"streamSid": call.stream_sid}),
    "no_event_type": lambda call: json.dumps({"event": 42}),
    "bad_media": lambda call: json.dumps({"event": "media", "media": "not an object"}),
    "bad_track": lambda call: json.dumps({"event": "media", "media": {"track": 1, "payload": "//8="}}),
    "object_track": lambda call: json.dumps({"event": "media", "media": {"track": {}, "payload": "//8="}}),
    "list_track": lambda call: json.dumps({"event": "media", "media": {"track": [], "payload": "//8="}}),
    "missing_payload": lambda call: json.dumps({"event": "media", "media": {"track": "inbound"}}),
    "payload_type": lambda call: json.dumps({"event": "media", "media": {"track": "inbound", "payload": 5}}),
    "bad_base64": lambda call: json.dumps({"event": "media", "media": {"track": "inbound", "payload": "!!notb64"}}),
    "bad_timestamp": lambda call: json.dumps({"event": "media", "media": {
        "track": "inbound", "payload": "//8=", "timestamp": "soon"}}),
    "bad_sequence": lambda call: json.dumps({"event": "dtmf", "sequenceNumber": [1], "dtmf": {"digit": "1"}}),
    "boolean_sequence": lambda call: json.dumps({"event": "dtmf", "sequenceNumber": True, "dtmf": {"digit": "1"}}),
    "bad_dtmf": lambda call: json.dumps({"event": "dtmf", "dtmf": None}),
    "bad_mark": lambda call: json.dumps({"event": "mark", "mark": {"name": 3}}),
    "empty": lambda call: "",
    "binary": lambda call: b"\x00\x01binary",
    "deep_json": lambda call: "[" * 30000 + "]" * 30000,
    "second_connected": lambda call: call.connected(),
    "second_start": lambda call: call.start(),
    "huge_timestamp": lambda call: json.dumps({"event": "media", "media": {
        "track": "inbound", "payload": "//8=", "timestamp": "9" * 4300}}),
}
EXPECTED_KIND = {"no_event_type": "no_event", "bad_track": "media", "object_track": "media", "list_track": "media",
                 "bad_media": "media", "missing_payload": "payload", "payload_type": "payload", "bad_base64": "payload",
                 "bad_timestamp": "timestamp", "bad_sequence": "sequenceNumber", "boolean_sequence": "sequenceNumber",
                 "bad_dtmf": "dtmf", "bad_mark": "mark", "deep_json": "invalid_json", "huge_timestamp": "timestamp"}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_named_counted_and_survived(name, warnings):
    call = Call()
    opening = call.session(media=1)
    bad = BAD_INPUTS[name](call)
    stream = handled([*opening, bad, *(call.media("inbound", SILENCE, 20 * (i + 2)) for i in range(5)), call.stop()])
    fields = summary(stream)
    kind = EXPECTED_KIND.get(name, name)
    assert fields["ended"] == "stop"
    assert fields["media"] == "6", "every good message around the bad one is counted"
    assert fields["bad"] == "1" and fields[f"bad_{kind}"] == "1"
    assert not any(field.startswith("bad_bad_") for field in fields)
    skipped = [line for line in warnings() if f"stream={call.stream_sid} skipped message" in line]
    assert len(skipped) == 1 and len(skipped[0]) < 300, skipped


DEEP = "[" * 1000 + "]" * 1000  # JSON that orjson reads, and whose str() goes past Python's recursion limit


def with_deep(message: dict) -> str:
    return json.dumps(message).replace('"DEEP"', DEEP)


@pytest.mark.parametrize("start", [{"start": []}, {"start": {"tracks": ["inbound"]}},
                                   {"start": {"streamSid": "MZ1", "customParameters": "x"}},
                                   {"start": {"streamSid": "MZ1", "tracks": ["DEEP"]}}],
                         ids=["start-a-list", "no-streamSid", "parameters-a-string", "tracks-nested-deep"])
def test_a_bad_start_is_skipped_and_a_good_one_after_it_still_starts_the_stream(start):
    call = Call()
    stream = handled([call.connected(), with_deep({"event": "start", **start}), *call.session(media=2)[1:]])
    assert summary(stream)["stream"] == call.stream_sid
    assert (summary(stream)["bad_start"], summary(stream)["media"]) == ("1", "2")


def test_odd_values_in_start_are_logged_safely_at_debug_level(caplog):
    caplog.set_level(logging.DEBUG, logger="mediastreams")
    call = Call(params={"deep": "DEEP", "text": "a\nb"})
    start = json.loads(call.start())
    start["start"]["mediaFormat"] = {"encoding": "DEEP", "sampleRate": {"x": 1}, "channels": 1}
    stream = handled([call.connected(), with_deep(start), call.media("inbound", SILENCE, 20)])
    assert summary(stream)["media"] == "1" and summary(stream)["bad"] == "0"
    lines = [r.getMessage() for r in caplog.records]
    assert f"stream={call.stream_sid} customParameters={{'deep': 'list', 'text': 'a?b'}}" in lines
    assert any("unexpected media format list/dict/1" in line for line in lines)


def test_media_before_start_is_dropped_with_a_warning(warnings):
    call = Call()
    stream = handled([call.connected(), call.media("inbound", SILENCE, 0), *call.session(media=4)[1:]])
    assert summary(stream)["media"] == "4" and summary(stream)["bad_media_before_start"] == "1"
    assert "remote=test skipped message: media before 'start': dropped" in warnings()


def test_gaps_duplicates_and_out_of_order_are_counted(warnings):
    call = Call()
    first = call.session(media=3)  # sequence 1..4 (start is 1), timestamps 20, 40, 60
    skipped = call.media("inbound", SILENCE, 80)  # held back: a 20 ms gap, then out of order
    late = [call.media("inbound", SILENCE, 100 + 20 * i) for i in range(3)]
    fields = summary(handled([*first, first[-1], late[0], late[1], skipped, late[2]]))
    assert fields["media"] == "7", "3 + 3 + the late one, not the duplicate"
    assert (fields["duplicates"], fields["out_of_order"], fields["gaps"]) == ("1", "1", "1")
    assert f"stream={call.stream_sid} gap track=inbound: 20 ms of audio missing before timestamp=100 chunk=5" \
        in warnings()


def test_warnings_are_capped_per_stream_but_all_counted(warnings):
    call = Call()
    fields = summary(handled([*call.session(), *["nope"] * 150, call.media("inbound", SILENCE, 20)]))
    assert fields["bad_invalid_json"] == "150" and fields["media"] == "1"
    assert len(warnings()) == 101 and "more than 100 warnings" in warnings()[-1]


def test_unknown_events_are_counted_and_named_once_each(caplog):
    caplog.set_level(logging.INFO, logger="mediastreams")
    call = Call()
    stream = handled([*call.session(), *[json.dumps({"event": name}) for name in ["closed", "closed", "x-new"]]])
    assert summary(stream)["bad_unknown_event"] == "3"
    assert [r.getMessage() for r in caplog.records if "unknown event" in r.getMessage()] == [
        f"stream={call.stream_sid} unknown event 'closed': ignored",
        f"stream={call.stream_sid} unknown event 'x-new': ignored"]


@pytest.mark.parametrize("event", ["audio", "unknown", "finish", "summary", "end", "handle", "parse"])
def test_a_client_can_call_only_the_methods_the_event_table_names(event):
    class Watched(app.MediaStream):
        called = []

        def on_audio(self, *args):
            self.called.append("on_audio")

        def finish(self):
            self.called.append("finish")

    stream = handled([*Call().session(), json.dumps({"event": event, "track": "x"})], Watched)
    assert Watched.called == [] and summary(stream)["bad_unknown_event"] == "1"


def test_a_subclass_adds_an_event_to_the_table():
    class WithCustom(app.MediaStream):
        EVENTS = {**app.MediaStream.EVENTS, "custom": "on_custom"}
        customs = 0

        def on_custom(self, data):
            self.customs += data["custom"]["n"]

    call = Call()
    stream = handled([*call.session(media=1), json.dumps({"event": "custom", "custom": {"n": 2}})] * 1, WithCustom)
    assert stream.handle(json.dumps({"event": "custom", "custom": {"n": 3}})) == "custom"
    assert stream.customs == 5 and summary(stream)["bad"] == "0" and summary(stream)["media"] == "1"


def test_a_subclass_overrides_an_events_method():
    class Digits(app.MediaStream):
        def on_dtmf(self, data):
            self.digits = getattr(self, "digits", "") + data["dtmf"]["digit"]

    call = Call()
    assert handled([*call.session(), call.dtmf("4"), call.dtmf("2")], Digits).digits == "42"


def test_overriding_on_audio_is_enough_to_get_every_chunk_as_pcm_in_order():
    class Listener(app.MediaStream):
        def setup(self):
            self.heard = []

        def on_audio(self, track, timestamp, pcm):
            self.heard.append((track, timestamp, pcm))

    audio = encode_ulaw(tone(0.04))
    call = Call()
    stream = handled([call.connected(), call.start(), *call.play({"inbound": audio})], Listener)
    stream.finish()  # what waits for on_audio() in its greenlet is handled before the summary
    assert stream.heard == [("inbound", 20 * (n + 1), app.ulaw_to_pcm16(audio[n * CHUNK:(n + 1) * CHUNK]))
                            for n in range(2)]
    assert summary(stream)["audio_dropped"] == "0"


# Fuzzing: no message a client can send ends a call or breaks the next message's handling.

SID = "MZ" + "0" * 32
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def either(valid):
    """A field's valid value, or any JSON value in its place."""
    return st.one_of(st.just(valid), JSON_VALUES)


def shaped(event, body_name=None, **body):
    fields = {"event": either(event), "sequenceNumber": either("3"), "streamSid": either(SID)}
    if body_name:
        fields[body_name] = st.one_of(JSON_VALUES, st.fixed_dictionaries({k: either(v) for k, v in body.items()}))
    return st.fixed_dictionaries(fields).map(json.dumps)


FUZZED_MESSAGES = st.one_of(
    shaped("media", "media", track="inbound", chunk="2", timestamp="40", payload="/w=="),
    shaped("start", "start", streamSid=SID, callSid="CA1", tracks=["inbound"], customParameters={"a": "b"},
           mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}),
    shaped("dtmf", "dtmf", track="inbound_track", digit="5"),
    shaped("mark", "mark", name="m"),
    shaped("stop", "stop", accountSid="AC1", callSid="CA1"),
    shaped("connected"),
    JSON_VALUES.map(json.dumps),
    st.text(max_size=50),
    st.binary(max_size=50),
)


@settings(max_examples=1000, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FUZZED_MESSAGES, min_size=1, max_size=4))
def test_no_message_ends_a_call(fuzzed):
    call = Call()
    stream = handled(call.session(media=1))
    for message in fuzzed:
        stream.handle(message)  # raises nothing: every bad message is counted
    counted = stream.tracks["inbound"].messages
    stream.handle(json.dumps({"event": "media", "media": {"track": "inbound", "payload": "/w==", "timestamp": "9"}}))
    assert stream.tracks["inbound"].messages == counted + 1
    stream.finish()


def test_a_bug_in_any_hook_of_yours_is_counted_and_shown_once_and_the_call_goes_on(caplog):
    caplog.set_level(logging.INFO, logger="mediastreams")

    class Buggy(app.MediaStream):
        EVENTS = {**app.MediaStream.EVENTS, "custom": "on_custom"}

        def setup(self):
            raise KeyError("setup")

        def on_dtmf(self, data):
            super().on_dtmf(data)
            raise ValueError(f"key {data['dtmf']['digit']}")

        def on_custom(self, data):
            raise ZeroDivisionError("custom")

    call = Call()
    stream = handled([*call.session(media=2), call.dtmf("1"), call.dtmf("2"), '{"event": "dtmf"}',
                      json.dumps({"event": "custom"}), call.media("inbound", SILENCE, 60), call.stop()], Buggy)
    stream.finish()
    fields = stream.summary().fields()
    assert (fields["setup_errors"], fields["on_dtmf_errors"], fields["on_custom_errors"]) == ("1", "2", "1")
    assert (fields["ended"], fields["media"], fields["bad_dtmf"]) == ("stop", "3", "1"), "a bad message is still bad"
    shown = [r for r in caplog.records if "bug in" in r.getMessage()]
    assert [r.getMessage().split(": ")[0].split()[-1] for r in shown] == ["setup()", "on_dtmf()", "on_custom()"]
    assert all(r.exc_info for r in shown), "each first one with its traceback"
