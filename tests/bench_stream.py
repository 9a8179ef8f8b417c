"""The stream class tests/bench_load.py runs our server with: a class of yours as far as
app.py can tell, it notes when each chunk reaches its on_audio() (in the call's audio
greenlet) and, when the stream ends, writes ARRIVALS_DIR/<streamSid>.bin, pairs of float64
(the chunk's media timestamp in ms, its arrival on time.monotonic()), the format the peers
in tests/peers/ write too. The note costs an append; what any on_audio() pays comes on top:
the PCM decode and the hand-over to the audio greenlet."""
import os
import time
from array import array
from dataclasses import dataclass, field

import app

ARRIVALS_DIR = os.environ.get("ARRIVALS_DIR")


@dataclass(eq=False)
class ArrivalTimes(app.MediaStream):
    arrivals: array = field(default_factory=lambda: array("d"))

    def on_audio(self, track: str, timestamp: int, pcm: bytes) -> None:
        self.arrivals.extend((timestamp, time.monotonic()))

    def finish(self) -> None:
        super().finish()
        if ARRIVALS_DIR and self.stream_sid:
            with open(os.path.join(ARRIVALS_DIR, self.stream_sid + ".bin"), "wb") as file:
                self.arrivals.tofile(file)
