"""meteorit-consumer: drains the queue into a database in atomic, leased batches.

Owns: `command` (the command line), the pipeline, `batches` (the Lua scripts), `rows`
(records decoded into columns) and one module per sink. Reads the queue record through
meteorit.record. Must not import the master or the worker: it runs on any machine.
"""
