-- One event per request (about 210 bytes), as a website's tracker would send it.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"type":"pageview","url":"https://example.com/products/meteorit?ref=newsletter","referrer":"https://news.example.org/","session":"4f9c2a7e-1b3d-4c5e-8f6a-9b0c1d2e3f4a","screen":"1920x1080","lang":"en-GB"}'
