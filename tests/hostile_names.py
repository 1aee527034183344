"""Trees whose file names hold every byte a filesystem allows in a name, for the unit and lab tests."""

import os
from pathlib import Path

# The names issue 22 lists: a newline, a tab, a backslash, a leading dash, bytes that are not UTF-8, 255 bytes.
HOSTILE_NAMES = [b"line\nbreak", b"tab\there", b"back\\slash", b"\\leading-backslash", b"-leading-dash",
                 b"not-utf8-\xff\xfe", b"n" * 255, b"\\\nboth\\n", b"carriage\rreturn", b"@tree x", b"sep\x1c\x85"]


def make_tree(root: Path, names: list[bytes]) -> Path:
    (root / "sub").mkdir(parents=True)
    for index, name in enumerate(names):
        for directory in (root, root / "sub"):
            with open(os.path.join(os.fsencode(directory), name), "wb") as stream:
                stream.write(b"content %d of " % index + name)
    os.symlink(b"target\nwith newline", os.path.join(os.fsencode(root), b"link\nname"))
    return root


def tree_bytes(root: Path) -> dict[bytes, bytes]:
    """{path below ROOT: its bytes, or its target for a symlink}, with names as the bytes they are."""
    found = {}
    for directory, _, files in os.walk(os.fsencode(root)):
        for name in files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, os.fsencode(root))
            found[relative] = os.readlink(path) if os.path.islink(path) else open(path, "rb").read()
    return found
