"""Peer anchor: the same Twilio sink on asyncio + the websockets library. With ARRIVALS_DIR
set, it writes each stream's arrival times at `stop` (arrivals.py)."""
import asyncio, base64, json, sys
import websockets
from arrivals import Arrivals

async def media(ws):
    count = 0
    arrivals = Arrivals()
    async for message in ws:
        data = json.loads(message)
        if data["event"] == "media":
            base64.b64decode(data["media"]["payload"])
            arrivals.media(data)
        elif data["event"] == "stop":
            arrivals.stop(data)
            break
        count += 1

async def main(port):
    async with websockets.serve(media, "127.0.0.1", port, max_size=2**20, compression=None):
        await asyncio.Future()

asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5001))
