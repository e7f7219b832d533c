/*! meteorit.js: sends a web page's events to meteorit. No dependencies; never throws into the page.
 *
 *   <script src="https://collect.example/v1/meteorit.js" data-key="pk_live_1"></script>
 *   <script>
 *     meteorit.track("pageview", {path: location.pathname});
 *   </script>
 *
 * or, without data attributes: meteorit.init({endpoint: "https://collect.example", key: "pk_live_1"}).
 *
 * Events wait in a queue and leave in batches: a POST of a JSON array to /v1/events with
 * fetch(..., {keepalive: true}) when batchSize events are waiting or flushInterval ms after
 * the first, and with navigator.sendBeacon when the page is hidden or left (pagehide,
 * visibilitychange), which outlives the page. The key goes in the query string (?key=)
 * because a beacon cannot send headers: use a public key (auth.public_keys). Bodies are sent
 * as text/plain, a "simple" request: no CORS preflight round trip before each batch.
 *
 * 429 and 503 put the batch back and wait for Retry-After; a network error (or a response
 * the browser withholds, for an origin not allowed) waits 1, 2, 4... s, at most maxRetries
 * times for one batch. Any other answer ends the batch (a 400 will not get better). The
 * queue holds at most maxQueue events; past it, the oldest are dropped and counted.
 * Each event gets an id (the server's idempotency key), so a batch sent twice (a lost
 * answer, then a retry) is stored once by the consumer.
 */
(function (window) {
  "use strict";
  if (window.meteorit && window.meteorit.version) {
    return; // included twice: keep the first one's queue
  }
  var BEACON_BYTES = 60000; // browsers refuse beacons and keepalive bodies over 64 KiB in flight
  var MAX_WAIT = 300000; // ms: the longest Retry-After or backoff honoured
  var options = {endpoint: "", key: "", batchSize: 20, flushInterval: 2000, maxQueue: 500, maxRetries: 5};
  var queue = [];
  var counts = {tracked: 0, sent: 0, dropped: 0, retries: 0, beacons: 0, retryAfter: null};
  var timer = null;
  var timerAt = 0; // when the timer fires
  var sending = false;
  var again = false; // flush() was called while a batch was on its way: send on when it is back
  var notBefore = 0; // ms timestamp: nothing is sent by fetch before it (Retry-After, backoff)
  var failures = 0; // consecutive failures of the batch at the head of the queue

  function guard(fn) {
    return function () {
      try {
        return fn.apply(this, arguments);
      } catch (e) {
        return undefined; // a tracker must never break the page it measures
      }
    };
  }

  function init(opts) {
    for (var name in opts || {}) {
      if (Object.prototype.hasOwnProperty.call(options, name) && opts[name] !== undefined && opts[name] !== null) {
        options[name] = opts[name];
      }
    }
    options.endpoint = String(options.endpoint).replace(/\/+$/, "");
    return api;
  }

  function uuid() {
    var c = window.crypto;
    if (c && typeof c.randomUUID === "function") {
      return c.randomUUID(); // secure contexts only (https, localhost)
    }
    var b = new Uint8Array(16);
    if (c && c.getRandomValues) {
      c.getRandomValues(b);
    } else {
      for (var i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = "";
    for (var j = 0; j < 16; j++) h += (b[j] + 0x100).toString(16).slice(1);
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function track(type, props) {
    if (typeof type !== "string" || !type) {
      return false;
    }
    var event = {};
    if (props && typeof props === "object") {
      for (var name in props) {
        if (Object.prototype.hasOwnProperty.call(props, name)) event[name] = props[name];
      }
    }
    event.type = type;
    if (event.id === undefined) event.id = uuid();
    if (event.ts === undefined) event.ts = Date.now();
    JSON.stringify(event); // throws here (cycles, BigInt) rather than block every batch after it
    queue.push(event);
    counts.tracked++;
    trim();
    if (queue.length >= options.batchSize) {
      flush();
    } else {
      schedule(options.flushInterval);
    }
    return true;
  }

  function trim() {
    if (queue.length > options.maxQueue) {
      counts.dropped += queue.length - options.maxQueue;
      queue.splice(0, queue.length - options.maxQueue); // the oldest go first
    }
  }

  // A flush in `ms`, unless one is due sooner already.
  function schedule(ms) {
    var at = Date.now() + Math.max(0, ms);
    if (!queue.length || (timer !== null && timerAt <= at)) {
      return;
    }
    if (timer !== null) {
      clearTimeout(timer);
    }
    timerAt = at;
    timer = setTimeout(guard(function () {
      timer = null;
      flush();
    }), at - Date.now());
  }

  function url() {
    return options.endpoint + "/v1/events" + (options.key ? "?key=" + encodeURIComponent(options.key) : "");
  }

  // The first events of the queue whose JSON fits in `bytes` (at least one event).
  function take(bytes) {
    var n = Math.min(queue.length, options.batchSize);
    var body = JSON.stringify(queue.slice(0, n));
    while (n > 1 && body.length > bytes) {
      n = Math.ceil(n / 2);
      body = JSON.stringify(queue.slice(0, n));
    }
    return {events: queue.splice(0, n), body: body};
  }

  function flush() {
    var wait = notBefore - Date.now();
    if (sending) {
      again = true;
      return;
    }
    if (!queue.length || !options.endpoint) {
      return;
    }
    if (wait > 0) {
      return schedule(wait);
    }
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
    var batch = take(BEACON_BYTES);
    var request;
    try {
      request = window.fetch(url(), {
        method: "POST", body: batch.body, headers: {"Content-Type": "text/plain"},
        keepalive: batch.body.length <= BEACON_BYTES, mode: "cors", credentials: "omit"
      });
    } catch (e) {
      queue = batch.events.concat(queue); // no fetch, or a bad endpoint: keep them (maxQueue bounds it)
      throw e;
    }
    sending = true;
    request.then(guard(function (response) {
      if (response.status === 429 || response.status === 503) {
        retry(batch.events, retryAfter(response.headers.get("Retry-After")));
      } else {
        failures = 0;
        counts.sent += response.status < 300 ? batch.events.length : 0;
        counts.dropped += response.status < 300 ? 0 : batch.events.length;
      }
      done();
    }), guard(function () {
      retry(batch.events, null);
      done();
    }));
  }

  function done() {
    sending = false;
    var wait = notBefore - Date.now();
    var asked = again;
    again = false;
    if (wait > 0) {
      schedule(wait); // a batch put back: due when Retry-After or the backoff says
    } else if (asked || queue.length >= options.batchSize) {
      flush();
    } else {
      schedule(options.flushInterval);
    }
  }

  function retry(events, seconds) {
    failures++;
    if (failures > options.maxRetries) {
      failures = 0;
      counts.dropped += events.length;
      return;
    }
    counts.retries++;
    counts.retryAfter = seconds; // the last Retry-After honoured (null: none, a backoff)
    queue = events.concat(queue);
    trim();
    var ms = seconds !== null ? seconds * 1000 : 1000 * Math.pow(2, failures - 1);
    notBefore = Date.now() + Math.min(ms, MAX_WAIT);
  }

  function retryAfter(value) {
    if (!value) return null;
    var seconds = Number(value);
    if (!isNaN(seconds)) return Math.max(0, seconds);
    var at = Date.parse(value); // the HTTP-date form
    return isNaN(at) ? null : Math.max(0, (at - Date.now()) / 1000);
  }

  // The page is going away (or may be, once hidden): what is queued leaves now, by beacon.
  function leave() {
    if (!options.endpoint || !navigator.sendBeacon) {
      return;
    }
    while (queue.length) {
      var batch = take(BEACON_BYTES);
      if (!navigator.sendBeacon(url(), batch.body)) {
        queue = batch.events.concat(queue); // the browser's beacon quota is full: keep them
        return;
      }
      counts.beacons++;
      counts.sent += batch.events.length;
    }
  }

  function stats() {
    return {queued: queue.length, tracked: counts.tracked, sent: counts.sent, dropped: counts.dropped,
            retries: counts.retries, beacons: counts.beacons, retryAfter: counts.retryAfter};
  }

  var api = {
    version: "1",
    init: guard(init),
    track: guard(track),
    flush: guard(flush),
    stats: guard(stats)
  };
  window.meteorit = api;

  guard(function () {
    var script = document.currentScript;
    if (script) {
      var src = script.getAttribute("src") || "";
      init({
        endpoint: script.getAttribute("data-endpoint") || (src ? new URL(src, location.href).origin : ""),
        key: script.getAttribute("data-key") || ""
      });
    }
    window.addEventListener("pagehide", guard(leave));
    document.addEventListener("visibilitychange", guard(function () {
      if (document.visibilityState === "hidden") leave();
    }));
  })();
})(window);
