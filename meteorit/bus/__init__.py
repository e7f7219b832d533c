"""The IPC bus: named alerts between the master and the workers over pipes, in 4K packets.

Owns: `ipc` (the ngx.ipc API: send, broadcast, receive, reply, sender, request, gather,
and the Bus behind it), `wire` (the packet format) and `pipes` (one per slot, made before
fork). Must not touch, nor import, the master, the worker or the consumer: it is a
library any process can host.
"""
