"""A worker plugin for the multi-process IPC tests (loaded through `server.plugins`).

Each worker that imports it listens on `$METEORIT_PROBE_DIR/w<slot>-<pid>.sock` and
takes one JSON command per line (send, broadcast, request, gather, spam, received,
stats, stop_reading, start_reading), so a test can drive the real bus of a real worker
and read back what it received. It records every alert it is sent, and answers
`probe.echo` (reply with the same data) and `probe.whoami` (reply with ipc.sender, read
after an await).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import orjson

from meteorit.bus import ipc
from meteorit.errors import IpcError

received: list[dict[str, Any]] = []


def record(name: str) -> Any:
    def handler(data: bytes) -> None:
        received.append({"name": name, "sender": ipc.sender, "size": len(data),
                         "sha": hashlib.sha256(data).hexdigest(), "head": data[:32].decode(errors="replace")})
    return handler


def echo(data: bytes) -> None:
    ipc.reply("probe.echo-reply", data)


async def whoami(data: bytes) -> None:
    await asyncio.sleep(0.01)  # another alert may be handled meanwhile: sender must hold
    ipc.reply("probe.whoami-reply", str(ipc.sender))


ipc.receive({"probe.record": record("probe.record"), "probe.echo": echo,
             "probe.echo-reply": record("probe.echo-reply"), "probe.whoami": whoami})


async def command(cmd: dict[str, Any]) -> Any:
    bus = ipc.bus()
    op = cmd["op"]
    data = cmd.get("data", "").encode()
    if "size" in cmd:
        data = (cmd.get("data", "x") * cmd["size"]).encode()[:cmd["size"]]
    if op == "send":
        ipc.send(cmd["pid"], cmd["name"], data)
    elif op == "broadcast":
        ipc.broadcast(cmd["name"], data)
    elif op == "request":
        return (await ipc.request(cmd["pid"], cmd["name"], data, cmd.get("timeout", 2.0))).decode()
    elif op == "gather":
        replies = await ipc.gather(cmd["name"], data, cmd.get("timeout", 2.0))
        return {str(pid): reply.decode() for pid, reply in replies.items()}
    elif op == "spam":  # count alerts as fast as possible; how many the bus took
        accepted = 0
        for i in range(cmd["count"]):
            try:
                ipc.send(cmd["pid"], cmd["name"], b"%d:" % i + data)
                accepted += 1
            except IpcError:
                if cmd.get("stop_on_full"):
                    break
        return accepted
    elif op == "received":
        return received
    elif op == "stats":
        return {**bus.stats(), "partial_bytes": bus.reassembler.partial_bytes, "pid": os.getpid()}
    elif op == "stop_reading":
        asyncio.get_running_loop().remove_reader(bus.read_fd)
    elif op == "start_reading":
        asyncio.get_running_loop().add_reader(bus.read_fd, bus.on_readable)
    else:
        raise ValueError(f"unknown op {op!r}")
    return True


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        try:
            answer = {"ok": await command(orjson.loads(line))}
        except (IpcError, TimeoutError, ValueError, KeyError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        writer.write(orjson.dumps(answer) + b"\n")
        await writer.drain()
    writer.close()


servers: list[asyncio.AbstractServer] = []  # a server nobody references is collected


async def listen() -> None:
    path = os.path.join(os.environ["METEORIT_PROBE_DIR"], f"w{ipc.bus().slot}-{os.getpid()}.sock")
    servers.append(await asyncio.start_unix_server(serve, path=path, limit=64 * 1024 * 1024))


asyncio.get_event_loop().create_task(listen())
