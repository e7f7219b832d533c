// Sends Segment calls to meteorit through the real Node SDK (@segment/analytics-node), for
// tests/test_segment_sdks.py. One argument, a JSON object:
//   {"host": "http://127.0.0.1:PORT", "writeKey": "...", "settings": {...}, "calls": [{"method": "track", "params": {...}}]}
// `settings` go to `new Analytics(...)` as they are (flushAt, maxRetries, httpRequestTimeout...).
// Makes every call, waits for closeAndFlush, then prints one JSON object on stdout:
//   {"delivered": [event, ...], "failed": [{"event", "reason"}], "requests": [{"messageIds", "retryCount"}],
//    "statuses": [200, ...]}
// where each event is the message as the SDK built it, and each request one POST it made.
'use strict'

const { Analytics } = require('@segment/analytics-node')

async function main() {
  const spec = JSON.parse(process.argv[2])
  const analytics = new Analytics({ writeKey: spec.writeKey, host: spec.host, ...spec.settings })
  const out = { delivered: [], failed: [], requests: [], statuses: [] }
  analytics.on('http_request', (request) => {
    const body = JSON.parse(request.body)
    out.requests.push({
      messageIds: body.batch.map((message) => message.messageId),
      retryCount: Number(request.headers['X-Retry-Count'] || 0),
      url: request.url,
    })
  })
  analytics.on('http_response', (response) => out.statuses.push(response.status))
  const pending = spec.calls.map(({ method, params }) => new Promise((resolve) => {
    analytics[method](params, (error, ctx) => {
      if (error) out.failed.push({ event: ctx && ctx.event, reason: String(error.reason || error) })
      else out.delivered.push(ctx.event)
      resolve()
    })
  }))
  await analytics.closeAndFlush({ timeout: spec.timeout || 25000 })
  await Promise.all(pending)
  process.stdout.write(JSON.stringify(out) + '\n')
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack || error) + '\n')
  process.exit(1)
})
