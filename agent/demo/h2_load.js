// HTTP/2 (h2c, prior knowledge) load with Node's http2 client (nghttp2), for
// agent/demo/h2_load.py: CONNECTIONS sessions, each with STREAMS requests in
// flight, for SECONDS. A session that gets GOAWAY finishes the streams it
// covers and is replaced by a new one for the next requests, as an HTTP/2
// client should (RFC 9113 6.8). Every request sent counts: a failure is
// counted, never retried. Prints one JSON object.
//
//   node h2_load.js URL CONNECTIONS STREAMS SECONDS
'use strict';
const http2 = require('http2');

const [url, connections, streams, seconds] = [process.argv[2], +process.argv[3],
  +process.argv[4], +process.argv[5]];
const TIMEOUT_MS = 10000;
const deadline = Date.now() + seconds * 1000;
const stats = { sent: 0, ok: 0, failed: 0, errors: {}, versions: {}, sessions: 0, goaways: 0 };
const latencies = [];

function fail(kind) {
  stats.failed += 1;
  stats.errors[kind] = (stats.errors[kind] || 0) + 1;
}

class Connection {
  constructor() { this.session = null; }

  current() {
    const s = this.session;
    if (s && !s.closed && !s.destroyed && !s.zddGoaway) return s;
    stats.sessions += 1;
    const fresh = http2.connect(url);
    fresh.on('error', () => {}); // each stream reports its own failure
    fresh.on('goaway', () => { fresh.zddGoaway = true; stats.goaways += 1; });
    this.session = fresh;
    return fresh;
  }

  request() {
    return new Promise((resolve) => {
      let req;
      try {
        req = this.current().request({ ':path': new URL(url).pathname });
      } catch (e) { // the session got GOAWAY just now: nothing was sent
        this.session = null;
        resolve();
        return;
      }
      stats.sent += 1;
      const t = process.hrtime.bigint();
      let status = 0;
      let body = '';
      req.setTimeout(TIMEOUT_MS, () => req.close(http2.constants.NGHTTP2_CANCEL));
      req.setEncoding('utf8');
      req.on('response', (h) => { status = h[':status']; });
      req.on('data', (d) => { body += d; });
      let settled = false;
      const settle = (failure) => {
        if (settled) return;
        settled = true;
        if (failure) fail(failure);
        resolve();
      };
      req.on('error', (e) => settle(e.code || 'error'));
      req.on('close', () => {
        if (status !== 200) {
          settle(status ? `status ${status}` : `no response (rst ${req.rstCode})`);
          return;
        }
        try {
          const v = JSON.parse(body).version || '?';
          stats.versions[v] = (stats.versions[v] || 0) + 1;
        } catch (e) {
          settle('unreadable body');
          return;
        }
        stats.ok += 1;
        latencies.push(Number(process.hrtime.bigint() - t) / 1e6);
        settle(null);
      });
      req.end();
    });
  }

  async loop() {
    while (Date.now() < deadline) await this.request();
  }

  close() { if (this.session) this.session.close(); }
}

async function main() {
  const conns = Array.from({ length: connections }, () => new Connection());
  await Promise.all(conns.flatMap((c) => Array.from({ length: streams }, () => c.loop())));
  conns.forEach((c) => c.close());
  latencies.sort((a, b) => a - b);
  const pct = (p) => (latencies.length
    ? Math.round(latencies[Math.floor(p * (latencies.length - 1))] * 100) / 100 : 0);
  process.stdout.write(JSON.stringify({ ...stats, connections, streams,
    p50_ms: pct(0.5), p99_ms: pct(0.99) }) + '\n');
}

main();
