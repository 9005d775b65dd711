"""Documents the knowledge tests add: text, Markdown, HTML and a PDF made by hand."""

from __future__ import annotations

GUIDE_MD = """# Libra guide

Libra is a Discord bot that answers by text and by voice.

## Installing

Run pipx install libra-bot, then libra up. The embedded stack needs no servers.

## Backups

The log lives under the data directory; copy the nats folder while Libra is stopped.
"""

PAGE_HTML = """<html><head><title>Ignored title</title><style>p { color: red }</style></head>
<body><h1>Opening hours</h1><p>The bakery opens at seven in the morning.</p>
<script>var secret = "do not index me";</script><p>It closes at&nbsp;six.</p></body></html>
"""


def pdf_with_text(text: str) -> bytes:
    """A one-page PDF showing ``text`` (ASCII), with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % at for at in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)
