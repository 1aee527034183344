"""What reaches the terminal from a host: its text with every control character shown as an escape, never acted on.

A host's bytes (exec output, log tails, causes, notes) could otherwise move the cursor, erase or forge the lines of
other hosts, or set the terminal's title. Newlines and tabs are kept; the JSON report keeps the text as it came.
"""

from __future__ import annotations

KEPT = "\n\t"


def safe_text(text: str, kept: str = KEPT) -> str:
    """TEXT with every character that is not printable (controls, bidi overrides, zero-width and odd spaces, bytes
    that were not UTF-8) as a visible escape, but for KEPT."""
    return "".join(character if character in kept else _shown(character) for character in text)


def safe_field(text: str) -> str:
    """Text that must stay on its one line (a cause, a note, a table cell): a newline in it is shown as well."""
    return safe_text(text, kept="\t")


def safe_line(data: bytes) -> str:
    """One line of a host's output, decoded as UTF-8 where it can be, its line break dropped."""
    return safe_field(data.decode(errors="surrogateescape").rstrip("\r\n"))


def _shown(character: str) -> str:
    if character.isprintable():  # not: controls, formats (bidi overrides), surrogates, unassigned, odd spaces
        return character
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
