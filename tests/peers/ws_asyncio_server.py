"""Peer anchor: the same Twilio sink on asyncio + the websockets library. With ARRIVALS_DIR
set, it writes each stream's arrival times at `stop`, as ws_node_server.js does."""
import asyncio, base64, json, os, sys, time
from array import array
import websockets

ARRIVALS_DIR = os.environ.get("ARRIVALS_DIR")

async def media(ws):
    count = 0
    arrivals = array("d")
    async for message in ws:
        data = json.loads(message)
        if data["event"] == "media":
            base64.b64decode(data["media"]["payload"])
            if ARRIVALS_DIR:
                arrivals.extend((float(data["media"]["timestamp"]), time.monotonic()))
        elif data["event"] == "stop":
            if ARRIVALS_DIR:
                with open(os.path.join(ARRIVALS_DIR, data["streamSid"] + ".bin"), "wb") as file:
                    arrivals.tofile(file)
            break
        count += 1

async def main(port):
    async with websockets.serve(media, "127.0.0.1", port, max_size=2**20, compression=None):
        await asyncio.Future()

asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5001))
