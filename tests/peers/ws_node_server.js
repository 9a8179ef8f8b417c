// Peer anchor: the same Twilio sink on Node.js + ws (as in Twilio's Node samples).
// With ARRIVALS_DIR set, it notes when each media message was handled (CLOCK_MONOTONIC, the
// clock of Python's time.monotonic()) and writes ARRIVALS_DIR/<streamSid>.bin at `stop`:
// pairs of float64 (media timestamp in ms, arrival in s), for tests/bench_load.py.
const fs = require('fs');
const path = require('path');
const { WebSocketServer } = require('ws');
const port = Number(process.argv[2] || 5002);
const arrivalsDir = process.env.ARRIVALS_DIR;
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
wss.on('connection', (ws) => {
  let count = 0;
  const arrivals = [];
  ws.on('message', (message) => {
    const data = JSON.parse(message);
    if (data.event === 'media') {
      Buffer.from(data.media.payload, 'base64');
      if (arrivalsDir) arrivals.push(Number(data.media.timestamp), Number(process.hrtime.bigint()) / 1e9);
    } else if (data.event === 'stop') {
      if (arrivalsDir) {
        fs.writeFileSync(path.join(arrivalsDir, `${data.streamSid}.bin`), Buffer.from(new Float64Array(arrivals).buffer));
      }
      ws.close();
      return;
    }
    count++;
  });
});
