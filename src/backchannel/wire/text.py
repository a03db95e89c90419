"""Text and the wire: what came off it, made safe to log; what goes on it, made sendable.

A peer chooses its Fault messages, GoAway and Cancel reasons, error messages and the
service and method names it quotes; logged verbatim, a newline in one forges a whole log
line and an ESC sequence rewrites the operator's terminal. Every such text is logged
through :func:`wire_text`: escaped like ``repr`` (no raw CR, LF, ESC or other control
or invisible character reaches the log) and cut to a bounded length.
"""

from __future__ import annotations

#: the longest text logged for one wire value, in characters (escapes included)
WIRE_TEXT_LIMIT = 300


def wire_text(text: object, limit: int = WIRE_TEXT_LIMIT) -> str:
    """``text`` (``str()`` of it, for an exception) escaped and cut to ``limit`` characters.

    Printable characters stay as they are (``é`` and ``中`` included); a backslash and
    every character ``str.isprintable`` refuses become their ``repr`` escape (``\\n``,
    ``\\x1b``, ``\\u202e``). A longer text is cut, on a character boundary, with a marker
    saying how many characters were left out.
    """
    try:
        text = text if type(text) is str else str(text)
    except Exception:  # an exception whose __str__ fails: say so rather than fail to log
        return f"<unprintable {type(text).__name__}>"
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape, nothing to cut
    pieces: list[str] = []
    length = 0
    for index, char in enumerate(text):
        piece = char if char.isprintable() and char != "\\" else repr(char)[1:-1]
        if length + len(piece) > limit:
            return "".join(pieces) + f"...[{len(text) - index} more characters cut]"
        pieces.append(piece)
        length += len(piece)
    return "".join(pieces)


def sendable_text(text: str) -> str:
    """``text`` with what UTF-8 cannot carry (lone surrogates) backslash-escaped: for
    words this side sends (exception messages, Fault, GoAway and Cancel reasons), which
    protobuf would otherwise refuse to encode, losing the message that carries them."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text
