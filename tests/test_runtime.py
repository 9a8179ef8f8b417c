"""Per-call logic in process, through a runtime built with the settings each test needs: no
server, no socket. Recording, the greeting and barge-in, transcripts (with a recognizer of
the test's), the handshake checks, and the call events that every console line, metric and
transcript file comes from."""
import dataclasses
import logging
import wave
from dataclasses import FrozenInstanceError

import gevent
import pytest

import app
from tests.conftest import ROOT, Events, SentMessages, call_on, runtime, samples
from tests.twilio_sim import CHUNK, Call, decode_ulaw, encode_ulaw, read_wav, tone, write_wav


def test_settings_are_frozen_and_read_settings_gives_the_defaults_as_settings_does():
    assert app.read_settings([], environ={}) == app.Settings()
    with pytest.raises(FrozenInstanceError):
        app.Settings().port = 80


def test_a_runtime_carries_what_start_up_derived_without_changing_the_settings():
    serving = app.create_runtime(app.Settings(max_streams=1000), max_streams=92)
    assert (serving.max_streams, serving.settings.max_streams) == (92, 1000)


def test_every_observable_thing_about_a_call_is_one_event_in_order():
    serving, events = runtime(), Events()
    serving.sinks.append(events)
    call = Call()
    stream = call_on(serving, [*call.session(media=3), call.dtmf("7"), "not json", '{"event": "new"}', call.stop()])
    assert [type(event).__name__ for event in events] == [
        "Accepted", "Connected", "Started", "FirstMedia", "Dtmf", "Warned", "UnknownEvent", "Stopped", "Ended"]
    assert all(event.call_key == stream.call_key for event in events)
    started, = events.of(app.Started)
    assert (started.call_sid, started.tracks) == (call.call_sid, ("inbound",))
    assert started.media_format == "audio/x-mulaw/8000/1"
    assert events.of(app.Dtmf)[0].digit == "7" and events[0].label == "remote=test"
    assert events.of(app.Ended)[0].summary.line().startswith(f"summary stream={call.stream_sid} call={call.call_sid} "
                                                      "ended=stop duration=")


def test_a_recording_holds_every_chunk_with_silence_where_the_timestamps_jumped(tmp_path):
    serving = runtime(record=str(tmp_path / "rec"))
    call = Call()
    audio = encode_ulaw(tone(0.2))
    media = [call.media("inbound", audio[n * CHUNK:(n + 1) * CHUNK], 20 * (n + 1) + (40 if n >= 5 else 0))
             for n in range(10)]  # 40 ms missing after the fifth chunk
    stream = call_on(serving, [call.connected(), call.start(), *media, call.stop()])
    path = tmp_path / "rec" / f"{call.stream_sid}_inbound.wav"
    expected = decode_ulaw(audio[:5 * CHUNK]) + [0] * 320 + decode_ulaw(audio[5 * CHUNK:])
    assert samples(path) == expected
    assert stream.tracks["inbound"].gaps == 1 and path.stat().st_mode & 0o777 == 0o600


def test_a_recording_stops_at_max_recording_seconds_and_the_call_goes_on(tmp_path):
    serving, events = runtime(record=str(tmp_path), max_recording_seconds=0.1), Events()
    serving.sinks.append(events)
    call = Call()
    stream = call_on(serving, call.session(media=10, stop=True))
    assert stream.tracks["inbound"].messages == 10 and stream.tracks["inbound"].recording.seconds == 0.1
    assert [e.message for e in events.of(app.Warned)] == [
        "recording stopped track=inbound: --max-recording-seconds 0.1 reached"]


def greeting_file(tmp_path, seconds=1.0):
    path = tmp_path / "greeting.wav"
    write_wav(path, tone(seconds, 300.0))
    return path


def test_the_greeting_plays_with_a_mark_at_its_end(tmp_path):
    serving = runtime(greet=str(greeting_file(tmp_path)))
    assert serving.stream_class is app.GreetStream
    call, sent = Call(), SentMessages()
    stream = call_on(serving, call.session(), ws=sent)
    greeting = encode_ulaw(read_wav(greeting_file(tmp_path)))
    media = [app.base64.b64decode(m["media"]["payload"]) for m in sent if m["event"] == "media"]
    assert b"".join(media) == greeting and len(media) == 50
    assert sent[-1] == {"event": "mark", "streamSid": call.stream_sid, "mark": {"name": "greeting"}}
    assert stream.played_back.marks_sent == 1


def test_a_caller_who_talks_over_the_greeting_clears_it_once(tmp_path):
    serving, events = runtime(greet=str(greeting_file(tmp_path, seconds=5.0))), Events()
    serving.sinks.append(events)
    call, sent = Call(), SentMessages()
    loud = encode_ulaw(tone(0.4, amplitude=0.5))  # 400 ms over the -35 dBFS barge-in threshold
    stream = call_on(serving, [*call.session(audio={"inbound": loud}), call.mark("greeting"), call.stop()], ws=sent)
    assert [m["event"] for m in sent].count("clear") == 1 and stream.barge_ins == 1
    barge_in, = events.of(app.BargeIn)
    assert 4.0 < barge_in.queued_seconds <= 5.0
    echo, = events.of(app.MarkEchoed)
    assert (echo.name, echo.cancelled) == ("greeting", True)
    assert stream.summary().line().endswith("barge_ins=1")


def test_transcripts_with_a_recognizer_of_the_tests_become_events_and_a_file(tmp_path):
    heard = []

    def recognize(pcm):
        heard.append(len(pcm))
        return f"an utterance of {len(pcm) // 16} ms"

    serving = app.create_runtime(app.Settings(transcribe=True, record=str(tmp_path)), recognize=recognize)
    events = Events()
    serving.sinks.append(events)
    call = Call()
    with wave.open(str(ROOT / "tests" / "speech" / "two_sentences.wav"), "rb") as speech:
        audio = app.pcm16_to_ulaw(speech.readframes(speech.getnframes()))
    stream = call_on(serving, [*call.session(audio={"inbound": audio}), call.stop()])
    lines = [(event.track, event.text) for event in events.of(app.Transcribed)]
    assert len(lines) == 2 and len(heard) >= 2 and all(track == "inbound" for track, _ in lines)
    written = (tmp_path / f"{call.stream_sid}_inbound.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in written] == [text for _, text in lines]
    assert "transcript=2 transcript_dropped=0" in stream.summary().line()


def test_a_stream_class_whose_mistakes_show_when_it_is_made_is_refused_in_one_line():
    class Missing(app.MediaStream):
        EVENTS = {**app.MediaStream.EVENTS, "custom": "on_custom"}

    class WrongAudio(app.MediaStream):
        def on_audio(self, pcm):
            pass

    class OwnInit(app.MediaStream):
        def __init__(self):
            pass

    messages = {Missing: "stream_class: Missing.EVENTS names 'on_custom' for 'custom', but Missing has no such method",
                WrongAudio: "stream_class: WrongAudio.on_audio() must take (self, track, timestamp, pcm)",
                OwnInit: "stream_class: OwnInit() must take (runtime, remote=, ws=) as app.MediaStream does: set "
                         "per-call state up in setup(), not __init__"}
    for stream_class, message in messages.items():
        with pytest.raises(app.SettingsError) as refused:
            app.create_runtime(app.Settings(), stream_class)
        assert str(refused.value) == message


SIGNED_URL = "wss://media.example.com/media"
TOKEN = "0123456789abcdef0123456789abcdef"


def handshake(**headers):
    environ = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_CONNECTION": "Upgrade",
               "HTTP_UPGRADE": "websocket", "HTTP_SEC_WEBSOCKET_VERSION": "13", "PATH_INFO": "/media",
               "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==", "HTTP_HOST": "10.0.0.5:5000"}
    environ.update({f"HTTP_{name.upper()}": value for name, value in headers.items()})
    return environ


def test_who_may_stream_is_decided_from_the_runtime_alone():
    serving = runtime(auth_token=TOKEN, public_url="https://media.example.com", max_streams=1)
    signature = app.twilio_signature(TOKEN, SIGNED_URL)
    assert app.refusal(serving, handshake(x_twilio_signature=signature)) is None
    assert app.refusal(serving, handshake())[1] == "no_signature"
    assert app.refusal(serving, handshake(x_twilio_signature="x"))[1] == "bad_signature"
    assert app.refusal(serving, {**handshake(x_twilio_signature=signature), "PATH_INFO": "/other"})[1] == "path"
    serving.open_websockets.add(object())
    assert app.refusal(serving, handshake(x_twilio_signature=signature))[:2] == ("503 Service Unavailable",
                                                                                 "max_streams")
    serving.open_websockets.clear()
    serving.shutting_down = True
    assert app.refusal(serving, handshake(x_twilio_signature=signature))[1] == "shutting_down"


def test_events_made_in_the_event_loops_callback_reach_the_sinks_from_a_greenlet_in_order():
    serving, where = runtime(), []
    serving.sinks.append(lambda event: where.append((type(event).__name__, gevent.getcurrent() is serving.hub)))
    stream = app.MediaStream(serving, remote="test")
    serving.hub.loop.run_callback(stream.warn, "made in the event loop")  # as on_readable's work is
    gevent.sleep(0)  # the hub runs the callback; the sinks get the event from their greenlet
    stream.emit(app.Stopped)  # made in a greenlet: after the one before it
    assert where == [("Accepted", False), ("Warned", False), ("Stopped", False)]


def test_every_sink_is_made_of_events_alone_built_here_without_a_stream(tmp_path, caplog):
    """A sink reads an event's fields, never the stream behind it: each is driven here by
    events made by hand, as another process's would be, and shows what they say."""
    import prometheus_client  # noqa: F401 (Metrics imports it)
    caplog.set_level(logging.INFO, logger="mediastreams")
    sid, call_sid = "MZ" + "7" * 32, "CA" + "7" * 32

    numbers = iter(range(1000))

    def event(kind, **fields):
        return kind(7, f"stream={sid}", sid, call_sid, next(numbers), **fields)

    recording = str(tmp_path / f"{sid}_inbound.wav")
    summary = app.CallSummary(
        sid, call_sid, "stop", 2.5, (app.TrackSummary("inbound", 100, 16000, 1), app.TrackSummary("outbound", 0, 0, 0)),
        duplicates=0, out_of_order=1, bad={"invalid_json": 2}, sent=0, marks_sent=0, marks_played=0, marks_cancelled=0,
        clears=0, unsent=0, audio_dropped=None, transcript=1, transcript_dropped=0, alerts=1, moods={"inbound": -0.3},
        talk={"inbound": 1.25}, overlap=0.0, silence=1.25,
        statuses=("stream-started",), recordings=((recording, 2.0),), recordings_stopped=0, recording_skipped=0,
        redacted=2, hook_errors={"on_dtmf": 3}, extra={"mine": "yes"})
    halfway = dataclasses.replace(summary, tracks=(app.TrackSummary("inbound", 40, 6400, 0),), bad={})
    events = [event(app.Accepted),
              event(app.Started, tracks=("inbound",), media_format="audio/x-mulaw/8000/1", parameters={"From": "+1555"}),
              event(app.RecordingStarted, track="inbound", path=recording), event(app.Dtmf, digit="4"),
              event(app.Counted, summary=halfway),
              event(app.Transcribed, track="inbound", at=1.5, text="I want my money back", mood=-0.3),
              event(app.Alerted, track="inbound", category="refund", phrase="money back", text="I want my money back"),
              event(app.Ended, summary=summary)]
    line = (f"summary stream={sid} call={call_sid} ended=stop duration=2.50s media=100 inbound=100/2.00s audio=2.00s "
            "bytes=16000 gaps=1 duplicates=0 out_of_order=1 bad=2 bad_invalid_json=2 transcript=1 transcript_dropped=0 "
            f"alerts=1 mood_inbound=-0.30 talk_inbound=1.25s overlap=0.00s silence=1.25s status=stream-started recordings={recording}:2.00s redacted=2 on_dtmf_errors=3 mine=yes")
    throttle = app.LogThrottle("stream warnings", 100)
    metrics, floor = app.Metrics(), app.Floor("elsewhere:1")
    publisher = app.RedisPublisher("redis://127.0.0.1:1/0", "elsewhere:1", 1000)
    publisher.start = lambda: None  # its records only: no Redis here
    sinks = [app.Console(throttle), metrics, floor, publisher, app.TranscriptFiles(str(tmp_path), throttle)]
    for each in events:
        for sink in sinks:
            sink(each)
    console = [record.getMessage() for record in caplog.records]
    assert console == [f"Connection accepted stream={sid}",
                       f"stream={sid} start call={call_sid} tracks=inbound format=audio/x-mulaw/8000/1 params=From",
                       f"stream={sid} dtmf digit=4",
                       f'stream={sid} transcript track=inbound at=1.50s text="I want my money back" mood=-0.30',
                       f'stream={sid} alert track=inbound category=refund phrase="money back" text="I want my money back"',
                       line]
    sample = metrics.registry.get_sample_value
    assert sample("mediastreams_media_messages_total", {"track": "inbound"}) == 100
    assert sample("mediastreams_audio_seconds_total", {"track": "inbound"}) == 2.0
    assert sample("mediastreams_bad_messages_total", {"kind": "invalid_json"}) == 2
    assert sample("mediastreams_streams_ended_total", {"ended": "stop"}) == 1 and sample("mediastreams_streams_open") == 0
    assert sample("mediastreams_alerts_total", {"category": "refund"}) == 1
    assert sample("mediastreams_recordings_total", {"result": "written"}) == 1
    shown, = floor.snapshot()["ended"]
    assert (shown["from"], shown["words"], shown["alerts"], shown["moods"]) == ("+1555", "I want my money back", 1,
                                                                                 {"inbound": [-0.3]})
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    assert shown["ended"]["summary"] == {k: v for k, v in fields.items() if k not in ("stream", "call")}
    assert [r["type"] for r in publisher.queue] == ["start", "dtmf", "transcript", "alert", "end"]
    assert {k: v for k, v in publisher.queue[-1].items() if k not in ("time", "type", "server", "uid")} == fields
    assert (tmp_path / f"{sid}_inbound.txt").read_text() == "1.50s I want my money back\n"
