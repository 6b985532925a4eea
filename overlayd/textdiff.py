"""Reading a changed file for a unified diff, as git decides text from binary (`saga diff`, the
MCP server's saga_diff). No trio, nothing of the daemon."""

import os


def read_text(path):
    """The lines of a text file; None for a binary one (a NUL byte or not UTF-8, as git decides);
    [] when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        data = f.read(1 << 20)
    if b"\0" in data[:8000]:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(data) - 4:  # not merely a character cut at the 1 MiB limit
            return None
        text = data[:exc.start].decode("utf-8")
    return text.splitlines(keepends=True)
