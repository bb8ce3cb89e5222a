"""Parses one RFC 5322 message from stdin with Python's standard email package (the parser a
mail client would use) and prints what the tests check, as JSON."""

import json
import sys
from email import policy
from email.parser import BytesParser

raw = sys.stdin.buffer.read()
msg = BytesParser(policy=policy.default).parsebytes(raw)


def defects(m):
    return [type(d).__name__ for d in m.defects]


parts = []
for part in msg.walk():
    if part.is_multipart():
        continue
    parts.append(
        {
            "content_type": part.get_content_type(),
            "charset": part.get_content_charset(),
            "body": part.get_content(),
            "defects": defects(part),
        }
    )

print(
    json.dumps(
        {
            "headers": {k.lower(): str(v) for k, v in msg.items()},
            "content_type": msg.get_content_type(),
            "defects": defects(msg),
            "parts": parts,
            # Every line ends in CRLF, none in a bare LF.
            "crlf_only": b"\n" not in raw.replace(b"\r\n", b""),
        }
    )
)
