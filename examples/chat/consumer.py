"""A chat room member: python examples/chat/consumer.py HOST:PORT NAME.

Joins as NAME, prints what is said in the room, and says each line read from stdin;
leaves at the end of stdin. Killing it instead (Ctrl-C, SIGKILL) is fine too: the room
forgets the member as soon as the stream ends.
"""

from __future__ import annotations

import argparse
import sys

from chat_service import Member, Room

import backchannel


class Printer(Member):
    """Prints what the room says."""

    def heard(self, who: str, text: str) -> None:
        print(f"<{who}> {text}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("name")
    options = parser.parse_args()
    with backchannel.Client(options.address, application=f"chat:{options.name}") as client:
        room = client.reference(Room)
        member = Printer()
        present = room.join(options.name, member)
        print(f"joined; in the room: {', '.join(present)}", flush=True)
        for line in sys.stdin:
            if line.strip():
                room.say(options.name, line.rstrip("\n"))
        room.leave(options.name, member)


if __name__ == "__main__":
    main()
