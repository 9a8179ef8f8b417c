"""Pretend to be Twilio: build Media Streams messages and play a call into a server.

    python -m tests.twilio_sim ws://localhost:5000/media --seconds 5
    python -m tests.twilio_sim ws://localhost:5000/media --wav hello.wav --tracks both

The messages follow ../shared/reference/twilio-media-streams.md section 2 (numbers as
strings, `connected` without a streamSid, 160-byte mu-law chunks every 20 ms). The
WebSocket client is a small stdlib one, so tests can also send what a real client never
would (binary frames, broken UTF-8, oversized length headers).
"""
import argparse
import base64
import itertools
import json
import math
import os
import socket
import struct
import sys
import time
import wave
from urllib.parse import urlsplit

CHUNK = 160  # bytes of mu-law per message: 20 ms at 8000 Hz


# --- Twilio's messages ----------------------------------------------------------------------

class Call:
    """The messages of one stream, numbered as Twilio numbers them."""

    _ids = itertools.count(1)

    def __init__(self, tracks=("inbound",), params=None, stream_sid=None):
        n = next(self._ids)
        self.stream_sid = stream_sid or f"MZ{os.getpid():08x}{n:024x}"
        self.call_sid = f"CA{n:032x}"
        self.account_sid = "AC" + "0" * 32
        self.tracks = list(tracks)
        self.params = params if params is not None else {}
        self.sequence = 0
        self.chunks = 0

    def _envelope(self, event, **body):
        self.sequence += 1
        return json.dumps({"event": event, "sequenceNumber": str(self.sequence),
                           "streamSid": self.stream_sid, **body})

    def connected(self):
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self):
        return self._envelope("start", start={
            "streamSid": self.stream_sid, "accountSid": self.account_sid, "callSid": self.call_sid,
            "tracks": self.tracks, "customParameters": self.params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}})

    def media(self, track, ulaw, timestamp):
        """One media message; `timestamp` in ms since the stream began."""
        self.chunks += 1
        return self._envelope("media", media={
            "track": track, "chunk": str(self.chunks), "timestamp": str(timestamp),
            "payload": base64.b64encode(ulaw).decode()})

    def dtmf(self, digit):
        return self._envelope("dtmf", dtmf={"track": "inbound_track", "digit": digit})

    def mark(self, name):
        return self._envelope("mark", mark={"name": name})

    def stop(self):
        return self._envelope("stop", stop={"accountSid": self.account_sid, "callSid": self.call_sid})

    def session(self, media=0, track="inbound", stop=False, chunk=b"\xff" * CHUNK, audio=None):
        """connected, start, `media` media messages of one track (timestamps 20, 40, ... ms),
        or all of `audio` ({track: mu-law bytes}, see play()), then stop if asked: a whole
        call, or the opening of one."""
        media = self.play(audio) if audio else (self.media(track, chunk, 20 * (n + 1)) for n in range(media))
        messages = [self.connected(), self.start(), *media]
        return messages + [self.stop()] if stop else messages

    def play(self, audio_by_track):
        """Media messages for whole tracks ({track: mu-law bytes}), interleaved chunk by chunk
        as Twilio sends both_tracks; timestamps start at 20 ms as in Twilio's example."""
        length = max(len(audio) for audio in audio_by_track.values())
        for offset in range(0, length, CHUNK):
            for track, audio in audio_by_track.items():
                if offset < len(audio):
                    yield self.media(track, audio[offset:offset + CHUNK], 20 + offset // 8)


# --- Audio ----------------------------------------------------------------------------------

def linear_to_ulaw(sample):
    """G.711 mu-law encoding of one 16-bit sample."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = magnitude.bit_length() - 8
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


ENCODE = bytes(linear_to_ulaw(s) for s in range(-32768, 32768))


def encode_ulaw(samples):
    return bytes(ENCODE[s + 32768] for s in samples)


def tone(seconds, frequency=440.0, amplitude=0.3, rate=8000):
    """Samples of a sine wave that swells and fades every few seconds, so a level meter moves."""
    return [int(32767 * amplitude * (0.55 + 0.45 * math.sin(2 * math.pi * 0.3 * i / rate))
                * math.sin(2 * math.pi * frequency * i / rate))
            for i in range(int(seconds * rate))]


def read_wav(path):
    """Samples of an 8 kHz mono 16-bit WAV file."""
    with wave.open(path, "rb") as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (8000, 1, 2):
            raise SystemExit(f"{path}: need 8000 Hz mono 16-bit PCM, got {wav.getframerate()} Hz, "
                             f"{wav.getnchannels()} channel(s), {8 * wav.getsampwidth()}-bit "
                             "(convert with: sox in.wav -r 8000 -c 1 -b 16 out.wav)")
        data = wav.readframes(wav.getnframes())
    return list(struct.unpack(f"<{len(data) // 2}h", data))


def write_wav(path, samples):
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(struct.pack(f"<{len(samples)}h", *samples))


# --- WebSocket frames and a small client ----------------------------------------------------

CLIENT_MASK = b"\x37\xfa\x21\x3d"


def frame(opcode, payload, fin=True, mask=CLIENT_MASK, rsv=0, length=None, length_form=None):
    """One client frame (RFC 6455 5.2). `mask=None` sends it unmasked, as no client may;
    `length` announces another size than the payload's; `length_form` (7, 16 or 64) picks
    the length encoding, which is otherwise the shortest."""
    length = len(payload) if length is None else length
    form = length_form or (7 if length < 126 else 16 if length < 65536 else 64)
    mask_bit = 0 if mask is None else 0x80
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if form == 7:
        head += bytes([mask_bit | length])
    elif form == 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if any(mask) else payload
    return head + mask + masked


def read_frames(data):
    """(opcode, payload) of each whole frame in bytes a server sent (unmasked)."""
    frames = []
    while len(data) >= 2:
        length, start = data[1] & 0x7F, 2
        if length == 126:
            length, start = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, start = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < start + length:
            break
        frames.append((data[0] & 0x0F, data[start:start + length]))
        data = data[start + length:]
    return frames


def close_code(payload):
    """The status code of a close frame's payload; 1005 (RFC 6455 7.1.5) when it has none."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


class HandshakeRefused(Exception):
    def __init__(self, status, body):
        super().__init__(f"handshake refused: {status} {body!r}")
        self.status = status
        self.body = body


class WSClient:
    """RFC 6455 client over a plain socket (ws:// only), enough for tests and load."""

    def __init__(self, url, headers=None, timeout=10.0):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
                 f"Host: {parts.netloc}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        for name, value in (headers or {}).items():
            lines = [line for line in lines if not line.lower().startswith(name.lower() + ":")]
            lines.append(f"{name}: {value}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.buffer = b""
        self.close_reason = None
        head = self._read_until(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            body = self.buffer
            try:
                while len(body) < 4096:
                    more = self.sock.recv(4096)
                    if not more:
                        break
                    body += more
            except OSError:
                pass
            self.sock.close()
            raise HandshakeRefused(status, body)

    def _read_more(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.buffer += data

    def _read_until(self, marker):
        while marker not in self.buffer:
            self._read_more()
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def _read_exactly(self, n):
        while len(self.buffer) < n:
            self._read_more()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, message):
        """A text frame for str, a binary frame for bytes."""
        if isinstance(message, str):
            self.sock.sendall(frame(0x1, message.encode()))
        else:
            self.sock.sendall(frame(0x2, message))

    def send_all(self, messages):
        for message in messages:
            self.send(message)

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv_frame(self):
        """(opcode, payload) of the next frame from the server."""
        first, second = self._read_exactly(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read_exactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read_exactly(8))[0]
        return first & 0x0F, self._read_exactly(length)

    def wait_closed(self, timeout=5.0):
        """The status code of the server's close frame (1005 if it had none), or None if the
        connection ended, or `timeout` passed, without one. As RFC 6455 asks, the close frame
        is answered with ours, and the socket closed once the server has closed its side."""
        self.sock.settimeout(timeout)
        try:
            while True:
                opcode, payload = self.recv_frame()
                if opcode == 0x8:
                    break
        except OSError:  # ConnectionError (EOF, reset) or a timeout
            return None
        self.close_reason = payload[2:].decode(errors="replace")
        try:
            self.sock.sendall(frame(0x8, payload[:2]))
            while self.sock.recv(65536):
                pass
        except OSError:
            pass  # the server closed first, or took longer than `timeout`: either way we are done
        self.sock.close()
        return close_code(payload)

    def close(self):
        try:
            self.sock.sendall(frame(0x8, struct.pack("!H", 1000)))
            self.wait_closed(2.0)
        except OSError:
            pass
        self.sock.close()


# --- The command --------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Play a simulated Twilio call into a Media Streams server.")
    parser.add_argument("url", nargs="?", default="ws://localhost:5000/media")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the generated tone")
    parser.add_argument("--wav", help="8 kHz mono 16-bit WAV file to play instead of a tone")
    parser.add_argument("--tracks", choices=["inbound", "outbound", "both"], default="inbound")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a <Parameter> for start.customParameters (repeatable)")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                        help="an extra handshake header, e.g. X-Twilio-Signature:...")
    args = parser.parse_args(argv)

    samples = read_wav(args.wav) if args.wav else tone(args.seconds)
    ulaw = encode_ulaw(samples)
    tracks = ["inbound", "outbound"] if args.tracks == "both" else [args.tracks]
    # the outbound track gets the same audio a little quieter, so the two are told apart
    audio = {track: ulaw if i == 0 else encode_ulaw([s // 4 for s in samples]) for i, track in enumerate(tracks)}
    call = Call(tracks=tracks, params=dict(p.split("=", 1) for p in args.param))
    headers = dict(h.split(":", 1) for h in args.header)

    client = WSClient(args.url, headers={k.strip(): v.strip() for k, v in headers.items()})
    client.send(call.connected())
    client.send(call.start())
    next_at = time.monotonic()
    sent = 0
    for message in call.play(audio):
        client.send(message)
        sent += 1
        if sent % len(tracks) == 0:  # one message per track every 20 ms, as a live call
            next_at += 0.020
            time.sleep(max(0.0, next_at - time.monotonic()))
    client.send(call.stop())
    code = client.wait_closed()
    client.sock.close()
    print(f"sent stream={call.stream_sid} media={sent} ({len(ulaw) / 8000:.2f} s per track, "
          f"tracks={','.join(tracks)}) closed={code or 'without a close frame'}")


if __name__ == "__main__":
    sys.exit(main())
