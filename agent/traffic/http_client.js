// HTTP load with Node's own clients, for agent/traffic/http_client.py:
// HTTP/1.1 (http.Agent, keep-alive or Connection: close) or HTTP/2 cleartext
// with prior knowledge (http2, nghttp2). CONNECTIONS connections, STREAMS
// requests in flight on each (HTTP/1.1: one per connection, so CONNECTIONS x
// STREAMS sockets), for SECONDS. Every request sent counts: a failure (no
// response, or a 5xx) is counted, never retried.
//
// HTTP/2: a session that gets GOAWAY finishes the streams it covers and is
// replaced by a new one for the next requests, as RFC 9113 6.8 asks. A stream
// closed with REFUSED_STREAM was not processed (RFC 9113 8.7: safe to retry;
// nghttp2 refuses a stream itself when a GOAWAY arrives before its HEADERS
// left): it is retried once on a fresh session, and counted apart.
//
// Prints one JSON object: totals, errors by kind, versions that answered
// (a JSON body's "version"), and the series of agent/traffic/series.py.
//
//   node http_client.js '{"url": ..., "protocol": "h2", "connections": 8,
//                         "streams": 4, "seconds": 10, "keepalive": true}'
'use strict';
const http = require('http');
const http2 = require('http2');

const opts = JSON.parse(process.argv[2]);
const url = new URL(opts.url);
const TIMEOUT_MS = 10000;
const BUCKET_MS = 100;
const BASE_MS = 0.1;
const LOG_RATIO = Math.log(1.05);
const t0 = Date.now();
let deadline = t0 + opts.seconds * 1000;
// SIGINT/SIGTERM: start no more requests, finish those in flight, report.
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => { deadline = 0; });
const stats = { sent: 0, ok: 0, failed: 0, errors: {}, versions: {}, sessions: 0,
  goaways: 0, refused_retried: 0 };
const series = { t0: t0 / 1000, bucket: BUCKET_MS / 1000, ok: [], failed: [], hist: [] };

function bucket() {
  const i = Math.max(0, Math.floor((Date.now() - t0) / BUCKET_MS));
  while (series.ok.length <= i) {
    series.ok.push(0); series.failed.push(0); series.hist.push({});
  }
  return i;
}

function fail(kind) {
  stats.failed += 1;
  stats.errors[kind] = (stats.errors[kind] || 0) + 1;
  series.failed[bucket()] += 1;
}

function succeed(ms, body) {
  stats.ok += 1;
  const i = bucket();
  series.ok[i] += 1;
  const b = ms <= BASE_MS ? 0 : Math.ceil(Math.log(ms / BASE_MS) / LOG_RATIO);
  series.hist[i][b] = (series.hist[i][b] || 0) + 1;
  let v = '?';
  try { v = JSON.parse(body).version || '?'; } catch (e) { /* not JSON: fine */ }
  stats.versions[v] = (stats.versions[v] || 0) + 1;
}

// One request's outcome from its status, body and timing.
function settle(status, body, started) {
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  if (status >= 200 && status < 500) succeed(ms, body);
  else fail(status ? `status ${status}` : 'no response');
}

class H2Connection {
  constructor() { this.session = null; }

  current() {
    const s = this.session;
    if (s && !s.closed && !s.destroyed && !s.zddGoaway) return s;
    stats.sessions += 1;
    const fresh = http2.connect(url.origin);
    fresh.on('error', () => {}); // each stream reports its own failure
    // (not "goaway": Http2Session.goaway() is a method)
    fresh.on('goaway', () => { fresh.zddGoaway = true; stats.goaways += 1; });
    this.session = fresh;
    return fresh;
  }

  request(retry = true) {
    return new Promise((resolve) => {
      let req;
      try {
        req = this.current().request({ ':path': url.pathname + url.search });
      } catch (e) { // the session got GOAWAY just now: nothing was sent
        this.session = null;
        resolve();
        return;
      }
      stats.sent += 1;
      const started = process.hrtime.bigint();
      let status = 0;
      let body = '';
      let done = false;
      const finish = (failure) => {
        if (done) return;
        done = true;
        if (failure && retry && status === 0
            && req.rstCode === http2.constants.NGHTTP2_REFUSED_STREAM) {
          stats.sent -= 1; // not processed: the retry is the request
          stats.refused_retried += 1;
          this.session = null;
          this.request(false).then(resolve);
          return;
        }
        if (failure) fail(failure); else settle(status, body, started);
        resolve();
      };
      req.setTimeout(TIMEOUT_MS, () => req.close(http2.constants.NGHTTP2_CANCEL));
      req.setEncoding('utf8');
      req.on('response', (h) => { status = h[':status']; });
      req.on('data', (d) => { body += d; });
      req.on('error', (e) => finish(`${e.code || 'error'} (rst ${req.rstCode})`));
      req.on('close', () => finish(status ? null : `no response (rst ${req.rstCode})`));
      req.end();
    });
  }

  close() { if (this.session) this.session.close(); }
}

class H1Connection {
  constructor() {
    this.agent = new http.Agent({ keepAlive: opts.keepalive, maxSockets: 1 });
  }

  request() {
    return new Promise((resolve) => {
      stats.sent += 1;
      const started = process.hrtime.bigint();
      let done = false;
      const finish = (failure, status, body) => {
        if (done) return;
        done = true;
        if (failure) fail(failure); else settle(status, body, started);
        resolve();
      };
      const headers = opts.keepalive ? {} : { Connection: 'close' };
      const req = http.get(url, { agent: this.agent, headers, timeout: TIMEOUT_MS }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d) => { body += d; });
        res.on('end', () => finish(null, res.statusCode, body));
        res.on('error', (e) => finish(e.code || 'error'));
      });
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', (e) => finish(e.code || e.message || 'error'));
    });
  }

  close() { this.agent.destroy(); }
}

async function main() {
  const Conn = opts.protocol === 'h2' ? H2Connection : H1Connection;
  const perConn = opts.protocol === 'h2' ? opts.streams : 1;
  const count = opts.protocol === 'h2' ? opts.connections : opts.connections * opts.streams;
  const conns = Array.from({ length: count }, () => new Conn());
  const loop = async (c) => { while (Date.now() < deadline) await c.request(); };
  // A stream whose session a server tore down without a frame for it can be
  // left with neither a response nor an error event (seen with stock
  // hypercorn at shutdown): node then runs out of work and would exit
  // without a report. Such requests are counted as failed ("hung").
  process.on('beforeExit', () => {
    for (let n = stats.sent - stats.ok - stats.failed; n > 0; n -= 1) fail('hung');
    report(count, perConn);
  });
  await Promise.all(conns.flatMap((c) => Array.from({ length: perConn }, () => loop(c))));
  conns.forEach((c) => c.close());
  report(count, perConn);
}

let reported = false;
function report(count, perConn) {
  if (reported) return;
  reported = true;
  process.stdout.write(JSON.stringify({ ...stats, protocol: opts.protocol,
    connections: count, streams: perConn, series }) + '\n');
}

main();
