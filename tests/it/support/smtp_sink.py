"""A real SMTP server for the notifications tests (aiosmtpd), with behaviours the tests ask for.

Usage: python smtp_sink.py --dir DIR [--throttle-first N] [--reject-prefix PREFIX]

Listens on 127.0.0.1 on a free port and prints `PORT <n>` once it accepts connections.
- Every accepted message is saved as DIR/NNNN.eml (the DATA bytes exactly as received), with
  DIR/NNNN.json holding the envelope ({"mail_from", "rcpt_tos"}); the .eml appears last.
- The first N MAIL FROM commands are answered `451 4.7.0` (throttled, try again later).
- RCPT TO an address whose local part starts with PREFIX is answered `550 5.1.1` (user unknown).
- DIR/attempts counts MAIL FROM commands: one per delivery attempt.
"""

import argparse
import asyncio
import json
import os

from aiosmtpd.smtp import SMTP

parser = argparse.ArgumentParser()
parser.add_argument("--dir", required=True)
parser.add_argument("--throttle-first", type=int, default=0)
parser.add_argument("--reject-prefix", default="reject")
args = parser.parse_args()


class Sink:
    def __init__(self):
        self.attempts = 0
        self.saved = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.attempts += 1
        with open(os.path.join(args.dir, "attempts"), "w") as f:
            f.write(str(self.attempts))
        if self.attempts <= args.throttle_first:
            return "451 4.7.0 Too many messages from you, slow down"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.split("@", 1)[0].startswith(args.reject_prefix):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.saved += 1
        stem = os.path.join(args.dir, f"{self.saved:04d}")
        with open(stem + ".json", "w") as f:
            json.dump({"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos}, f)
        with open(stem + ".tmp", "wb") as f:
            f.write(envelope.original_content)
        os.rename(stem + ".tmp", stem + ".eml")
        return f"250 2.0.0 Ok: queued as Q{self.saved:04d}"


async def main():
    loop = asyncio.get_running_loop()
    handler = Sink()
    server = await loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
