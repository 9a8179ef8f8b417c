"""Arrival times for tests/bench_load.py, for the Python peers (ws_node_server.js does the
same in JavaScript): with ARRIVALS_DIR set, each media message's arrival is noted, and at
`stop` ARRIVALS_DIR/<streamSid>.bin gets pairs of float64 (media timestamp in ms, arrival
on time.monotonic())."""
import os
import time
from array import array

ARRIVALS_DIR = os.environ.get("ARRIVALS_DIR")


class Arrivals:
    def __init__(self):
        self.times = array("d")

    def media(self, data: dict) -> None:
        if ARRIVALS_DIR:
            self.times.extend((float(data["media"]["timestamp"]), time.monotonic()))

    def stop(self, data: dict) -> None:
        if ARRIVALS_DIR:
            with open(os.path.join(ARRIVALS_DIR, data["streamSid"] + ".bin"), "wb") as file:
                self.times.tofile(file)
