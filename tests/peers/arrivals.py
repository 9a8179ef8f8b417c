"""The per-message work of the Python peers, and their arrival times for tests/bench_load.py
(ws_node_server.js does the same in JavaScript): each message is parsed, each media payload
decoded; with ARRIVALS_DIR set, each media message's arrival is noted, and at `stop`
ARRIVALS_DIR/<streamSid>.bin gets pairs of float64 (media timestamp in ms, arrival on
time.monotonic())."""
import base64
import json
import os
import time
from array import array

ARRIVALS_DIR = os.environ.get("ARRIVALS_DIR")


class Arrivals:
    def __init__(self):
        self.times = array("d")

    def handle(self, message: str) -> bool:
        """One message of a stream; True at its `stop`."""
        data = json.loads(message)
        if data["event"] == "media":
            base64.b64decode(data["media"]["payload"])
            self.media(data)
        elif data["event"] == "stop":
            self.stop(data)
            return True
        return False

    def media(self, data: dict) -> None:
        if ARRIVALS_DIR:
            self.times.extend((float(data["media"]["timestamp"]), time.monotonic()))

    def stop(self, data: dict) -> None:
        if ARRIVALS_DIR:
            with open(os.path.join(ARRIVALS_DIR, data["streamSid"] + ".bin"), "wb") as file:
                self.times.tofile(file)
