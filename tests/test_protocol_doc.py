"""docs/protocol.md names everything envelope.proto defines, so the spec cannot silently
fall behind the proto: every service method, message, field, oneof, enum and enum value
(read from the generated descriptor) must appear in the page as code (between backticks).
And its worked example's bytes are the frames its JSON shows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor

from backchannel.v1 import envelope_pb2

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "protocol.md"


def code_words(markdown: str) -> set[str]:
    """Every identifier written as code in ``markdown``: inside `spans` and ``` blocks,
    split on anything that is not a letter, digit or underscore (so `Call.one_way` gives
    Call and one_way)."""
    blocks = re.findall(r"```.*?```", markdown, flags=re.DOTALL)
    rest = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    spans = re.findall(r"`([^`\n]+)`", rest)
    return {word for text in [*blocks, *spans] for word in re.findall(r"\w+", text)}


def _message_names(message: Descriptor) -> Iterator[tuple[str, str]]:
    yield message.full_name, message.name
    for field in message.fields:
        yield f"{message.full_name}.{field.name}", field.name
    for oneof in message.oneofs:
        yield f"{message.full_name} oneof {oneof.name}", oneof.name
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:  # map<K, V>'s generated entry: not in the proto
            yield from _message_names(nested)


def proto_names() -> Iterator[tuple[str, str]]:
    """(where, name) of everything envelope.proto defines."""
    file = envelope_pb2.DESCRIPTOR
    for service in file.services_by_name.values():
        yield service.full_name, service.name
        for method in service.methods:
            yield f"{service.full_name}.{method.name}", method.name
    for message in file.message_types_by_name.values():
        yield from _message_names(message)
    for enum in file.enum_types_by_name.values():
        yield enum.full_name, enum.name
        for value in enum.values:
            yield f"{enum.full_name}.{value.name}", value.name


def missing(names: Iterable[tuple[str, str]], markdown: str) -> list[str]:
    """Where each name that the page does not write as code is defined."""
    words = code_words(markdown)
    return [where for where, name in names if name not in words]


def test_every_message_field_and_enum_value_of_the_proto_is_in_the_spec() -> None:
    names = list(proto_names())
    assert len(names) > 100  # the descriptor was read: 20-odd messages and their fields
    absent = missing(names, SPEC.read_text())
    assert not absent, f"docs/protocol.md does not mention (as `code`): {', '.join(absent)}"


def test_a_name_the_page_does_not_write_as_code_is_reported() -> None:
    page = 'The `Call` has an `id` and a ```\n{"one_way": true}\n``` and plain method.'
    names = [("Call", "Call"), ("Call.id", "id"), ("Call.one_way", "one_way")]
    assert missing([*names, ("Call.method", "method")], page) == ["Call.method"]


def test_the_spec_is_linked_from_the_readme_docs_list() -> None:
    assert "[docs/protocol.md](docs/protocol.md)" in (ROOT / "README.md").read_text()


def worked_example(markdown: str) -> list[tuple[str, bytes]]:
    """(JSON, gRPC message bytes) of each frame of the worked example's code blocks: a
    ``>>>`` or ``<<<`` line (and the JSON lines after it), then indented hex lines."""
    section = markdown.split("## 19.", 1)[1].split("\n## ", 1)[0]
    frames: list[tuple[str, bytes]] = []
    for block in re.findall(r"```\n(.*?)```", section, flags=re.DOTALL):
        for chunk in re.split(r"^(?:>>>|<<<) ", block, flags=re.MULTILINE)[1:]:
            json_lines, hex_lines = [], []
            for line in chunk.splitlines():
                target = hex_lines if re.fullmatch(r"\s+([0-9a-f]{2} ?)+", line) else json_lines
                target.append(line)
            frames.append(("\n".join(json_lines), bytes.fromhex(" ".join(hex_lines))))
    return frames


def test_the_worked_examples_bytes_are_the_frames_its_json_shows() -> None:
    frames = worked_example(SPEC.read_text())
    assert len(frames) == 8  # hello, welcome, call, callback call, 2 results, call, batch
    for text, message in frames:
        assert message[0] == 0, "the compressed flag: 0"
        assert int.from_bytes(message[1:5], "big") == len(message) - 5, text
        frame = envelope_pb2.Frame.FromString(message[5:])
        assert frame == json_format.Parse(text, envelope_pb2.Frame()), text
