"""meteorit: real-time event ingestion into a Redis queue.

The package is split by concern, one module per part of the design:
config (settings), log (structured logging), sock (listening sockets), embedded
(a private redis-server), master (the supervisor), worker (one process's event loop),
http (the HTTP/1.1 protocol), response (wire bytes of responses), app (routes and
auth), events (decoding, validation, queue records), writer (group commit to Redis),
ipc and ipc_wire (the IPC bus and its packets), errors, cli (the command line),
systemd (notify, socket activation, watchdog), privileges (running as server.user),
pidfile.
"""

__version__ = "0.1.0"
