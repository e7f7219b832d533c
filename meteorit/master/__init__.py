"""The master process: binds, forks and supervises the workers; does no request work.

Owns: `arbiter` (the loop, signals and what they start), the worker slots, the reload
roll, the control socket and its commands, listening sockets, systemd notify and socket
activation, the pid file and the embedded Redis. Must not touch: HTTP requests, events,
the queue (only workers write to Redis; the master only supervises an embedded one).
Nothing else imports this package but the entry points (cli, ctl).
"""
