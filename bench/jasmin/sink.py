"""A minimal SMPP 3.4 sink for the Jasmin comparison benchmark (bench/jasmin/run.sh).

Accepts any bind (transmitter, receiver, transceiver), answers enquire_link and unbind, and
answers every submit_sm with submit_sm_resp ESME_ROK and a fresh message id, keeping the time
of each. With ``--dlr`` it also sends a delivery receipt (deliver_sm, esm_class 0x04, stat
DELIVRD) for every submit_sm that asked for one (registered_delivery bit 0), on the same bind.

A line-based control port (``--control-port``) lets the load driver read and reset the counts:

    RESET                 -> OK
    STATS                 -> {"submits": n, "first": t, "last": t, "receipts": n, "binds": n}
    WAIT <n> <timeout_s>  -> the same JSON once n submits have arrived, or at the timeout

Times are ``time.time()`` (wall clock), comparable with the driver's on the same machine.
Standard library only: it runs under any Python 3.11.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import socket
import struct
import time
from typing import Any

HEADER = struct.Struct(">IIII")
GENERIC_NACK = 0x80000000
BIND_RECEIVER = 0x00000001
BIND_TRANSMITTER = 0x00000002
SUBMIT_SM = 0x00000004
DELIVER_SM = 0x00000005
UNBIND = 0x00000006
BIND_TRANSCEIVER = 0x00000009
ENQUIRE_LINK = 0x00000015
RESP = 0x80000000
ESME_ROK = 0
ESME_RINVCMDID = 3
TLV_RECEIPTED_MESSAGE_ID = 0x001E
TLV_MESSAGE_STATE = 0x0427
MESSAGE_STATE_DELIVERED = 2


class Counts:
    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.binds = 0  # kept by RESET
        self.reset()

    def reset(self) -> None:
        self.submits = 0
        self.receipts = 0
        self.first = 0.0
        self.last = 0.0

    def submitted(self) -> None:
        now = time.time()
        if not self.submits:
            self.first = now
        self.submits += 1
        self.last = now
        self.changed.set()

    def as_dict(self) -> dict[str, Any]:
        return {
            "submits": self.submits,
            "first": self.first,
            "last": self.last,
            "receipts": self.receipts,
            "binds": self.binds,
        }


def cstring(body: bytes, at: int) -> tuple[bytes, int]:
    end = body.index(b"\x00", at)
    return body[at:end], end + 1


def parse_submit(body: bytes) -> tuple[bytes, bytes, int]:
    """source_addr, destination_addr and registered_delivery of a submit_sm body."""
    _, at = cstring(body, 0)  # service_type
    source, at = cstring(body, at + 2)  # after source ton, npi
    dest, at = cstring(body, at + 2)  # after dest ton, npi
    at += 3  # esm_class, protocol_id, priority_flag
    _, at = cstring(body, at)  # schedule_delivery_time
    _, at = cstring(body, at)  # validity_period
    return source, dest, body[at]


def receipt_body(message_id: bytes, source: bytes, dest: bytes) -> bytes:
    """deliver_sm body of a delivery receipt: from the handset (dest) back to the sender."""
    stamp = time.strftime("%y%m%d%H%M").encode()
    text = b"id:" + message_id + b" sub:001 dlvrd:001 submit date:" + stamp + b" done date:" + stamp
    text += b" stat:DELIVRD err:000 text:"
    return (
        b"\x00"  # service_type
        + b"\x01\x01"
        + dest
        + b"\x00"
        + b"\x01\x01"
        + source
        + b"\x00"
        + bytes([0x04, 0, 0])  # esm_class: SMSC delivery receipt; protocol_id; priority
        + b"\x00\x00"  # schedule_delivery_time, validity_period
        + bytes([0, 0, 0, 0, len(text)])  # registered_delivery .. sm_default_msg_id, sm_length
        + text
        + struct.pack(">HH", TLV_RECEIPTED_MESSAGE_ID, len(message_id) + 1)
        + message_id
        + b"\x00"
        + struct.pack(">HHB", TLV_MESSAGE_STATE, 1, MESSAGE_STATE_DELIVERED)
    )


class Sink:
    def __init__(self, counts: Counts, dlr: bool, dlr_delay_s: float, quick_ack: bool) -> None:
        self.counts = counts
        self.quick_ack = quick_ack
        self.dlr = dlr
        self.dlr_delay_s = dlr_delay_s
        self.ids = itertools.count(1)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sequence = itertools.count(1)
        sock = writer.get_extra_info("socket")

        def quick_ack() -> None:
            # Acknowledge at once what Jasmin sends: its SMPP socket has Nagle on (no
            # TCP_NODELAY), so a small write (deliver_sm_resp) followed by another (the next
            # submit_sm) would otherwise wait for Linux's delayed ACK, 40 ms a message.
            if self.quick_ack:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

        def send(command: int, status: int, seq: int, body: bytes = b"") -> None:
            writer.write(HEADER.pack(16 + len(body), command, status, seq) + body)

        async def receipt(message_id: bytes, source: bytes, dest: bytes) -> None:
            if self.dlr_delay_s:
                await asyncio.sleep(self.dlr_delay_s)
            if writer.is_closing():
                return
            send(DELIVER_SM, 0, next(sequence), receipt_body(message_id, source, dest))
            self.counts.receipts += 1

        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                quick_ack()
                header = await reader.readexactly(16)
                length, command, _, seq = HEADER.unpack(header)
                body = await reader.readexactly(length - 16) if length > 16 else b""
                if command in (BIND_TRANSCEIVER, BIND_TRANSMITTER, BIND_RECEIVER):
                    send(command | RESP, ESME_ROK, seq, b"sink\x00")
                    self.counts.binds += 1
                elif command == SUBMIT_SM:
                    message_id = b"%d" % next(self.ids)  # decimal: Jasmin upper-cases receipt ids
                    send(SUBMIT_SM | RESP, ESME_ROK, seq, message_id + b"\x00")
                    self.counts.submitted()
                    if self.dlr:
                        source, dest, registered = parse_submit(body)
                        if registered & 0x03:
                            task = asyncio.create_task(receipt(message_id, source, dest))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                elif command == ENQUIRE_LINK:
                    send(ENQUIRE_LINK | RESP, ESME_ROK, seq)
                elif command == UNBIND:
                    send(UNBIND | RESP, ESME_ROK, seq)
                    await writer.drain()
                    break
                elif command & RESP:
                    pass  # deliver_sm_resp, generic_nack, enquire_link_resp
                else:
                    send(GENERIC_NACK, ESME_RINVCMDID, seq)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def control(
    counts: Counts, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while line := await reader.readline():
            words = line.decode().split()
            if not words:
                continue
            if words[0] == "RESET":
                counts.reset()
                writer.write(b"OK\n")
            elif words[0] == "WAIT":
                want, deadline = int(words[1]), time.monotonic() + float(words[2])
                while counts.submits < want and time.monotonic() < deadline:
                    counts.changed.clear()
                    try:
                        await asyncio.wait_for(
                            counts.changed.wait(), max(0.0, deadline - time.monotonic())
                        )
                    except TimeoutError:
                        break
                writer.write(json.dumps(counts.as_dict()).encode() + b"\n")
            else:  # STATS
                writer.write(json.dumps(counts.as_dict()).encode() + b"\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12776)
    parser.add_argument("--control-port", type=int, default=12777)
    parser.add_argument("--dlr", action="store_true", help="send delivery receipts")
    parser.add_argument("--dlr-delay", type=float, default=0.0, help="seconds before a receipt")
    parser.add_argument(
        "--delayed-ack", action="store_true", help="leave TCP delayed ACKs on (no TCP_QUICKACK)"
    )
    args = parser.parse_args()
    counts = Counts()
    sink = Sink(counts, args.dlr, args.dlr_delay, not args.delayed_ack)
    smpp = await asyncio.start_server(sink.serve, args.host, args.port)
    ctl = await asyncio.start_server(
        lambda r, w: control(counts, r, w), args.host, args.control_port
    )
    print(f"sink: SMPP on {args.host}:{args.port}, control on {args.control_port}", flush=True)
    async with smpp, ctl:
        await asyncio.gather(smpp.serve_forever(), ctl.serve_forever())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
