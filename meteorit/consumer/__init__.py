"""meteorit-consumer: drains the queue into a database in atomic, leased batches.

Owns: `command` (the command line and the process), `pipeline` (the Consumer's tasks and
queues), `progress` (counters and what is shown of them), `batches` (the Lua scripts),
`rows` (records decoded into columns), `sink` (what sinks share) and one module per sink
(`sqlite`, `ndjson`, `postgresql`). Reads the queue record through meteorit.record and
the sink URL grammar through meteorit.config. Must not import the master or the worker:
it runs on any machine.
"""
