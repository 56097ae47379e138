"""Reading the documentation pages' fenced code blocks (shared by tests/test_docs.py and tests/test_getting_started.py)."""
import re

FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)


def fenced_blocks(text: str, marker: str) -> list[tuple[str, str, str | None]]:
    """``(language, code, skip reason or None)`` of each fenced block of a page, in order; a block is skipped when the
    line before its fence is ``<!-- <marker>: skip (reason) -->`` (``marker``: ``snippet`` for the page snippets,
    ``getting-started`` for the steps of Getting started)."""
    skip_line = re.compile(rf"<!--\s*{re.escape(marker)}:\s*skip\s*(.*?)\s*-->\s*$")
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = skip_line.search(before)
        blocks.append((m.group(1), m.group(2), skip.group(1) if skip else None))
    return blocks
