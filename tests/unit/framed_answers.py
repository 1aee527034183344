"""A host's answer in sections as its script prints it, for tests that feed the parsers (`remote_probes.framed`)."""

import base64


def section(name: str, body: bytes | str = b"", argument: str = "") -> str:
    """The line that opens section NAME (with its ARGUMENT), then BODY in base64, as `framed` prints it."""
    data = body.encode(errors="surrogateescape") if isinstance(body, str) else body
    encoded = base64.encodebytes(data).decode()  # 76 characters a line, as coreutils' base64 wraps
    return f"{name}{' ' + argument if argument else ''}\n{encoded}"
