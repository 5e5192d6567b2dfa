#!/usr/bin/env python3
"""A real SMTP server for tests: accepts every message and stores it as <n>.eml.

Usage: smtp_sink.py HOST PORT DIR

Each message is written to a temporary file and renamed into place, so a reader never sees
half a message. Numbering continues after the files already in DIR, so a restarted sink
never overwrites what an earlier one received. Prints "ready" once it accepts connections
and runs until it is killed (SIGTERM or SIGINT).
"""

import asyncio
import os
import re
import signal
import sys

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, directory):
        self.directory = directory
        numbers = [
            int(m.group(1))
            for m in (re.fullmatch(r"(\d+)\.eml", f) for f in os.listdir(directory))
            if m
        ]
        self.next = max(numbers, default=0) + 1

    async def handle_DATA(self, server, session, envelope):
        n = self.next
        self.next += 1
        final = os.path.join(self.directory, f"{n}.eml")
        temp = os.path.join(self.directory, f".{n}.eml.tmp")
        with open(temp, "wb") as f:
            f.write(envelope.original_content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
        return "250 Message accepted for delivery"


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    host, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(directory, exist_ok=True)
    controller = Controller(
        Sink(directory), hostname=host, port=port, enable_SMTPUTF8=True
    )
    controller.start()
    print("ready", flush=True)

    loop = asyncio.new_event_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        loop.run_until_complete(stop)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
