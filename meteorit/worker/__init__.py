"""A worker process: serves HTTP on the shared sockets and writes events to Redis.

Owns: `process` (boot after fork, the event loop, alert handlers), `http` (the HTTP/1.1
protocol), `response`, `app` (the routes), `events` (body formats), `ratelimit`, `writer`
(group commit to Redis) and `spool` (the file events go to when Redis cannot take them).
Only `writer` and `spool` talk to Redis. Must not import the master: a worker never forks
and knows the master only as a pid on the bus.
"""
