"""Peer anchor: the same Twilio sink on asyncio + the websockets library. With ARRIVALS_DIR
set, it writes each stream's arrival times at `stop` (arrivals.py)."""
import asyncio, sys
import websockets
from arrivals import Arrivals

async def media(ws):
    arrivals = Arrivals()
    async for message in ws:
        if arrivals.handle(message):
            break

async def main(port):
    async with websockets.serve(media, "127.0.0.1", port, max_size=2**20, compression=None):
        await asyncio.Future()

asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5001))
