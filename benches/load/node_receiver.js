// The comparator integrators write today: a minimal Node.js receiver that
// checks the Mitel signature (HMAC-SHA256, constant-time compare), parses the
// JSON and keeps the latest status per principal in a Map. No framework.
//
// node benches/load/node_receiver.js 127.0.0.1 18082 <signing key>
'use strict';
const http = require('node:http');
const crypto = require('node:crypto');

const [host, port, key] = process.argv.slice(2);
const presence = new Map();

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    const given = Buffer.from(String(req.headers['x-notify-signature'] || ''), 'hex');
    const expected = crypto.createHmac('sha256', key).update(body).digest();
    if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) {
      res.writeHead(401).end();
      return;
    }
    let event;
    try {
      event = JSON.parse(body);
    } catch {
      res.writeHead(400).end();
      return;
    }
    const principal = String(event.subject || '').split('/').pop();
    const content = event.content || {};
    const current = presence.get(principal);
    if (!current || current.timestamp <= content.timestamp) {
      presence.set(principal, { status: content.presence, note: content.note, timestamp: content.timestamp });
    }
    res.writeHead(204).end();
  });
});
server.keepAliveTimeout = 60000;
server.listen(Number(port), host, () => console.log(`node receiver on ${host}:${port}`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
