"""Peer: the tutorial's stack as a user gets it today, plus the one fix it needs to work.

flask-sockets + gevent-websocket, no accelerators, the same per-message work as the other
peers (parse JSON, base64-decode media payloads), `websocket=True` on the rule. With
ARRIVALS_DIR set, it writes each stream's arrival times at `stop` (arrivals.py).
Run in a scratch venv with: pip install flask flask-sockets gevent gevent-websocket
"""
import sys

from flask import Flask
from flask_sockets import Sockets
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler
from werkzeug.routing import Rule

from arrivals import Arrivals

app = Flask(__name__)
sockets = Sockets(app)


def media(ws):
    arrivals = Arrivals()
    while not ws.closed:
        message = ws.receive()
        if message is None:
            continue
        if arrivals.handle(message):
            break


sockets.url_map.add(Rule("/media", endpoint=media, websocket=True))

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5003
    pywsgi.WSGIServer(("127.0.0.1", port), app, handler_class=WebSocketHandler, log=None).serve_forever()
