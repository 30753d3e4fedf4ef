"""Configure a running jasmind through jCli (telnet): a group, an HTTP user, an SMPP client
connector to the sink (started, unthrottled) and a default MT route to it.

Used by bench/jasmin/run.sh, run with the Jasmin virtualenv's Python (3.11: telnetlib is still
in the standard library there). Exits non-zero, printing the session, on any jCli error.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import telnetlib

# jCli's prompt, or an interactive session's "> " at the start of a line.
PROMPTS: list[bytes | re.Pattern[bytes]] = [b"jcli : ", re.compile(rb"(?:^|\n)> ")]


class JCli:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tn = telnetlib.Telnet(host, port, timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.transcript = b""
        self.expect()

    def expect(self) -> bytes:
        _, _, text = self.tn.expect(PROMPTS, timeout=20)
        self.transcript += text
        return text

    def login(self, username: str, password: str) -> None:
        self.tn.write(username.encode() + b"\r\n")
        self.tn.read_until(b"Password: ", timeout=10)
        self.tn.write(password.encode() + b"\r\n")
        self.expect()

    def run(self, command: str, *lines: str, ok: str = "Successfully") -> None:
        """One command, then the lines of its interactive session (closed with ``ok``)."""
        reply = b""
        for line in (command, *lines):
            self.tn.write(line.encode() + b"\r\n")
            reply = self.expect()
        if ok.encode() not in reply:
            sys.stderr.write(self.transcript.decode(errors="replace"))
            raise SystemExit(f"jCli: {command!r} did not answer {ok!r}")

    def close(self) -> None:
        self.tn.write(b"quit\r\n")
        self.tn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=18990)
    parser.add_argument("--admin", default="jcliadmin")
    parser.add_argument("--admin-password", default="jclipwd")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="benchpwd")
    parser.add_argument("--sink-port", type=int, default=12776)
    parser.add_argument("--timeout", type=float, default=60.0, help="to wait for jCli")
    args = parser.parse_args()

    cli = JCli("127.0.0.1", args.port, args.timeout)
    if b"Username" in cli.transcript:
        cli.login(args.admin, args.admin_password)
    cli.run("group -a", "gid benchgroup", "ok")
    cli.run(
        "user -a",
        f"username {args.user}",
        f"password {args.password}",
        "gid benchgroup",
        f"uid {args.user}",
        "ok",
    )
    cli.run(
        "smppccm -a",
        "cid sink",
        "host 127.0.0.1",
        f"port {args.sink_port}",
        "username bench",
        "password bench",
        "submit_throughput 0",  # 0: no QoS throttle (the default is 1 message per second)
        "ok",
    )
    cli.run("smppccm -1 sink")
    cli.run("mtrouter -a", "type defaultroute", "connector smppc(sink)", "rate 0.00", "ok")
    cli.close()
    print("jcli: group, user, connector 'sink' (started) and default MT route added")


if __name__ == "__main__":
    main()
