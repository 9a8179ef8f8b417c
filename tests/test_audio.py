"""Hearing the call: mu-law decoding, the level meter, WAV recordings, the audio hook."""
import math
import re
import resource
import signal
import struct
import subprocess
import sys

import pytest

import app
from tests.conftest import ROOT, Feed, call_on, decoded, free_port, readme_example, runtime, samples
from tests.twilio_sim import CHUNK, Call, encode_ulaw, read_wav, tone, write_wav


def g711_ulaw(code):
    """G.711 mu-law decoding written from the standard's segment table, with no bit tricks:
    the complemented code holds a sign, a 3-bit segment and a 4-bit step; segment s starts
    at 33 * 2**(s+2) - 132 and its steps are 2**(s+3) wide."""
    complemented = 255 - code
    negative = complemented >= 128
    segment = (complemented % 128) // 16
    step = complemented % 16
    magnitude = (33 + 2 * step) * 2 ** (segment + 2) - 132
    return -magnitude if negative else magnitude


def test_mulaw_table_standard_values():
    assert app.ULAW_TO_LINEAR[0xFF] == 0
    assert app.ULAW_TO_LINEAR[0x7F] == 0
    assert app.ULAW_TO_LINEAR[0x00] == -32124
    assert app.ULAW_TO_LINEAR[0x80] == 32124
    assert len(app.ULAW_TO_LINEAR) == 256


def test_mulaw_table_matches_the_g711_formula_for_every_code():
    assert app.ULAW_TO_LINEAR == [g711_ulaw(code) for code in range(256)]


def test_pcm16_is_little_endian_samples_of_the_table():
    ulaw = bytes(range(256)) * 2
    assert app.ulaw_to_pcm16(ulaw) == struct.pack("<512h", *[g711_ulaw(c) for c in ulaw])


def test_the_simulators_encoder_round_trips_through_the_decoder():
    """The simulator's encoder (tests) against the server's decoder, at every code."""
    for code in range(256):
        if code != 0x7F:  # -0 and +0 both decode to 0; the encoder picks 0xFF
            assert encode_ulaw([app.ULAW_TO_LINEAR[code]])[0] == code


def test_level_meter_reads_dbfs():
    full_scale_sine = 32768 ** 2 / 2
    assert "rms=  -3.0dBFS" in app.level_meter(full_scale_sine)
    assert "rms= -99.0dBFS" in app.level_meter(0)
    assert app.level_meter(full_scale_sine).endswith("|" + "#" * 19 + " |")


@pytest.mark.parametrize("frequency", [1000.0, 500.0, 2000.0, 440.0, 333.0])
def test_level_meter_reads_pure_tones_right(frequency):
    """The meter reads part of the chunks, and part of each, to stay cheap; a tone whose
    period divides its stride (1 kHz is 8 samples) must not fool it into reading one point
    of the wave."""
    chunks = encode_ulaw(tone(2.0, frequency, amplitude=0.25))
    decoded = [app.ULAW_TO_LINEAR[code] for code in chunks]
    expected = 10 * math.log10(sum(x * x for x in decoded) / len(decoded) / 32768 ** 2)
    call = Call()
    stream = app.MediaStream(runtime(), remote="test")
    for message in call.session():
        stream.handle(message)
    track = stream.tracks["inbound"]
    for n, start in enumerate(range(0, len(chunks), CHUNK)):
        stream.handle(call.media("inbound", chunks[start:start + CHUNK], 20 * n))
        track.next_level_at = math.inf  # no line, no reset: read what it gathered
    measured = 10 * math.log10(track.energy / track.energy_samples / 32768 ** 2)
    assert measured == pytest.approx(expected, abs=0.5)


def test_a_subclass_finds_what_twilio_said_of_the_call_on_the_stream():
    """What the README's table promises a subclass author, each as Twilio's `start` gave it."""
    seen = []

    class Seen(app.MediaStream):
        def on_dtmf(self, data):
            seen.append((self.label, self.stream_sid, self.call_sid, self.parameters, self.streamed_tracks,
                         self.remote, bool(self.listen_only)))

    call = Call(tracks=("inbound", "outbound"), params={"From": "+15550001", "Topic": "billing"})
    call_on(runtime(), [*call.session(media=2), call.dtmf("1"), call.stop()], stream_class=Seen)
    assert seen == [(f"stream={call.stream_sid}", call.stream_sid, call.call_sid,
                     {"From": "+15550001", "Topic": "billing"}, ("inbound", "outbound"), "test", True)]


def test_level_meter_survives_a_chunk_shorter_than_its_offset():
    """A 1-byte payload at a message whose sampling offset is past it samples nothing; if a
    level line is due then, there is nothing to divide by."""
    stream, track = app.MediaStream(runtime(), remote="test"), app.Track("inbound")
    track.messages, track.next_level_at = 2, 1.0  # a line is due, nothing sampled since the last
    stream.meter(track, b"\xff")
    assert track.next_level_at > 1.0


def paced_call(server, *args):
    out = subprocess.run([sys.executable, "-m", "tests.twilio_sim", server.url, *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return re.search(r"sent stream=(\S+)", out.stdout).group(1)


def test_level_meter_lines_at_most_once_a_second_per_track(start_server):
    server = start_server()
    sid = paced_call(server, "--seconds", "3.1", "--tracks", "both")
    summary = server.summary(sid)
    levels = re.findall(rf"stream={sid} level track=(\w+) rms=\s*(-?[\d.]+)dBFS \|[# ]{{20}}\|", server.log())
    for track in ("inbound", "outbound"):
        values = [float(db) for name, db in levels if name == track]
        assert 2 <= len(values) <= 3, levels
        assert all(-60 < db < -5 for db in values)
    inbound = [float(db) for name, db in levels if name == "inbound"]
    outbound = [float(db) for name, db in levels if name == "outbound"]
    assert inbound[0] - outbound[0] == pytest.approx(12, abs=1), "outbound is sent 1/4 as loud"
    assert summary["media"] == "310"


def test_quiet_levels_turns_the_console_meter_off_and_the_floor_keeps_its_levels(start_server):
    """Quiet is about the console: the floor (the README's transcript command is quiet) keeps its bars."""
    floor_port = free_port()
    server = start_server("--floor-port", str(floor_port), env={"QUIET_LEVELS": "1"})
    sid = paced_call(server, "--seconds", "1.5")
    assert server.summary(sid)["media"] == "75"
    assert " level " not in server.log()
    feed = Feed(floor_port, **{"Last-Event-ID": "0"})  # every event the floor has had
    feed.wait_for(lambda kind, event_id, record: record.get("type") == "end")
    assert [r["track"] for _, _, r in feed.events if r.get("type") == "level"] == ["inbound"]
    feed.close()


def test_both_tracks_recorded_aligned_with_silence_for_a_gap(start_server, tmp_path):
    record = tmp_path / "recordings"
    server = start_server("--record", str(record), "--quiet-levels")
    call = Call(tracks=["inbound", "outbound"])
    inbound = encode_ulaw(tone(1.0, 440))
    outbound = encode_ulaw(tone(1.0, 300, amplitude=0.1))
    messages = list(call.play({"inbound": inbound, "outbound": outbound}))
    # drop inbound chunks 20..24 (5 chunks, 100 ms): Twilio discarded them
    lost = {m for m in messages if '"track": "inbound"' in m and
            20 <= int(re.search(r'"chunk": "(\d+)"', m).group(1)) // 2 < 25}
    assert len(lost) == 5
    assert server.stream([call.connected(), call.start(), *[m for m in messages if m not in lost], call.stop()]) == 1000
    summary = server.summary(call.stream_sid)
    assert summary["gaps"] == "1" and summary["inbound"] == "45/0.90s" and summary["outbound"] == "50/1.00s"
    inbound_wav = record / f"{call.stream_sid}_inbound.wav"
    outbound_wav = record / f"{call.stream_sid}_outbound.wav"
    assert summary["recordings"] == f"{inbound_wav}:1.00s,{outbound_wav}:1.00s"
    expected = decoded(inbound[:20 * CHUNK]) + [0] * 800 + decoded(inbound[25 * CHUNK:])
    assert samples(inbound_wav) == expected
    assert samples(outbound_wav) == decoded(outbound)


def test_sigterm_mid_call_leaves_a_readable_wav(start_server, tmp_path):
    server = start_server("--record", str(tmp_path))
    audio = encode_ulaw(tone(0.6))
    client, call = server.open_call(audio={"inbound": audio})
    client.send(call.dtmf("1"))  # sent after the media: once logged, all audio has arrived
    server.wait_for(rf"stream={call.stream_sid} dtmf digit=1")
    assert server.stop_with(signal.SIGTERM, client) == [1001]
    summary = server.summary(call.stream_sid, timeout=0)
    assert summary["ended"] == "shutdown"
    assert samples(tmp_path / f"{call.stream_sid}_inbound.wav") == decoded(audio)


def test_dropped_socket_and_handler_crash_leave_valid_wavs(start_server, tmp_path):
    server = start_server("--record", str(tmp_path), "--quiet-levels")
    audio = encode_ulaw(tone(0.2))
    client, call = server.open_call(audio={"inbound": audio})
    client.sock.close()
    assert server.summary(call.stream_sid)["ended"] == "disconnect"
    assert samples(tmp_path / f"{call.stream_sid}_inbound.wav") == decoded(audio)


def test_recorded_wav_input_comes_back_within_mulaw_quantisation(start_server, tmp_path):
    source = tmp_path / "speech.wav"
    original = [int(s * (0.2 + 0.8 * i / 8000)) for i, s in enumerate(tone(1.0, 523, amplitude=0.9))]
    write_wav(str(source), original)
    server = start_server("--record", str(tmp_path / "out"))
    sid = paced_call(server, "--wav", str(source))
    assert server.summary(sid)["media"] == "50"
    back = read_wav(str(tmp_path / "out" / f"{sid}_inbound.wav"))
    assert len(back) == len(original)
    assert all(abs(a - b) <= abs(a) / 16 + 8 for a, b in zip(original, back))


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))  # half a second of PCM


def test_a_write_error_stops_the_recording_not_the_stream(start_server, tmp_path):
    server = start_server("--record", str(tmp_path / "rec"), "--quiet-levels", preexec_fn=limit_file_size)
    call = Call()
    audio = encode_ulaw(tone(1.5))  # 24 kB of PCM, past the 16 kB limit (and within the 2 s ahead of time)
    assert server.stream([call.connected(), call.start(), *call.play({"inbound": audio}), call.stop()]) == 1000
    summary = server.summary(call.stream_sid)
    assert (summary["ended"], summary["media"]) == ("stop", "75")
    assert re.search(rf"stream={call.stream_sid} recording stopped track=inbound: .*File too large", server.log())


@pytest.fixture
def readme_example_server(start_server):
    """Starts the README's process_audio.py, as written there."""
    return lambda: start_server("--quiet-levels", script=readme_example())


def test_the_readme_audio_hook_example_runs(readme_example_server):
    """The README's example of real-time processing, as written there, gets every chunk."""
    server = readme_example_server()
    call = Call(tracks=["inbound", "outbound"])
    audio = encode_ulaw(tone(0.5))
    server.stream([call.connected(), call.start(), *call.play({"inbound": audio, "outbound": audio}), call.stop()])
    server.wait_for(rf"stream={call.stream_sid} processed chunks=50 seconds=1.00 peak=\d+")
    assert server.summary(call.stream_sid)["media"] == "50"


def test_the_readme_audio_hook_example_ends_open_calls_on_sigterm(readme_example_server):
    """Its finish() waits for the worker: the server must wait for finish() in turn."""
    server = readme_example_server()
    client, call = server.open_call(audio={"inbound": encode_ulaw(tone(0.5))})
    client.send(call.dtmf("1"))
    server.wait_for(rf"stream={call.stream_sid} dtmf digit=1")  # after the media: all of it has been handled
    assert server.stop_with(signal.SIGTERM, client) == [1001]
    summary = server.summary(call.stream_sid, timeout=0)
    assert summary["ended"] == "shutdown"
    assert f"stream={call.stream_sid} processed chunks={summary['media']} " in server.log()


def test_the_mu_law_table_of_every_sample_is_g711s_own():
    """ulaw_of_sample() is made run by run (2 ms, so that a first play() in the event loop
    sounds no lateness alarm): each of the 65,536 samples gets the code G.711 gives it."""
    table = app.ulaw_of_sample()
    assert len(table) == 65536
    assert all(table[sample & 0xFFFF] == app.linear_to_ulaw(sample) for sample in range(-32768, 32768))
