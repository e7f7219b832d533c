-- A batch of 100 events per request (each about 205 bytes, about 21 KB per body), as a
-- server-side SDK flushing its buffer would send them. Built once when wrk loads the script.
local types = {"pageview", "click", "scroll", "session_start", "email_open"}
local events = {}
for i = 1, 100 do
  events[i] = string.format(
    '{"type":"%s","url":"https://example.com/products/meteorit?ref=newsletter&item=%04d",'
      .. '"referrer":"https://news.example.org/","session":"4f9c2a7e-1b3d-4c5e-8f6a-9b0c1d2e%04d",'
      .. '"screen":"1920x1080","seq":%d}',
    types[(i - 1) % #types + 1], i, i, i)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = "[" .. table.concat(events, ",") .. "]"
