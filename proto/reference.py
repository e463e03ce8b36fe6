"""Write docs/api-reference.md from the proto's own comments (run by ``make proto``).

Every service method, message, field, enum and value of
``proto/faceverify/v1/faceverify.proto`` is listed with the comment written above
it, so the reference cannot drift from the API: ``tests/test_proto.py`` fails when
the committed page differs from what this makes.
"""

from __future__ import annotations

import re
import sys
import tempfile
import textwrap
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "faceverify/v1/faceverify.proto"
PAGE = ROOT / "docs" / "api-reference.md"
WIDTH = 88  # prose lines of the docs

# Field numbers of descriptor.proto, the steps of a SourceCodeInfo path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 4, 5, 6, 12
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE, SERVICE_METHOD = 2, 2

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {getattr(F, name): name[len("TYPE_"):].lower() for name in F.Type.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
           if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")}


def descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The proto file compiled with its comments (protoc --include_source_info)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        if protoc.main(["protoc", f"-I{ROOT / 'proto'}", "--include_source_info",
                        f"--descriptor_set_out={out}", str(ROOT / "proto" / PROTO)]) != 0:
            raise SystemExit("protoc failed")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


class Comments:
    """The comment above each element, by its SourceCodeInfo path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self.by_path = {tuple(loc.path): loc for loc in file.source_code_info.location}

    def above(self, path: tuple[int, ...]) -> str:
        loc = self.by_path.get(path)
        return loc.leading_comments.strip("\n") if loc else ""

    def detached(self, path: tuple[int, ...]) -> list[str]:
        loc = self.by_path.get(path)
        return [c.strip("\n") for c in loc.leading_detached_comments] if loc else []


def prose(comment: str) -> str:
    """A comment as Markdown paragraphs: its lines joined, blank lines kept; a line
    indented further than the comment's text is kept as preformatted text."""
    blocks: list[str] = []
    lines = [line[1:] if line.startswith(" ") else line for line in comment.splitlines()]
    paragraph: list[str] = []
    verbatim: list[str] = []

    def close() -> None:
        if paragraph:
            blocks.append(textwrap.fill(" ".join(paragraph), WIDTH, break_long_words=False,
                                        break_on_hyphens=False))
            paragraph.clear()
        if verbatim:
            blocks.append("```text\n" + "\n".join(verbatim) + "\n```")
            verbatim.clear()

    for line in lines:
        if not line.strip():
            close()
        elif line.startswith("  "):
            if paragraph:
                close()
            verbatim.append(line)
        else:
            if verbatim:
                close()
            paragraph.append(line.strip())
    close()
    return "\n\n".join(blocks)


def cell(comment: str) -> str:
    """A comment in one table cell."""
    return " ".join(comment.split()).replace("|", "\\|")


def anchor(name: str) -> str:
    """GitHub's anchor for a heading holding *name* alone."""
    return re.sub(r"[^a-z0-9_ -]", "", name.lower()).replace(" ", "-")


class Page:
    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self.file = file
        self.comments = Comments(file)
        self.package = "." + file.package + "."
        self.maps: set[str] = set()
        self.lines: list[str] = []

    def local(self, type_name: str) -> str:
        return type_name[len(self.package):] if type_name.startswith(self.package) else type_name

    def scalar(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        """A map's key or value type (messages by name)."""
        return SCALARS.get(field.type) or self.local(field.type_name)

    def type_of(self, field: descriptor_pb2.FieldDescriptorProto,
                entries: dict[str, descriptor_pb2.DescriptorProto]) -> str:
        if field.type in (F.TYPE_MESSAGE, F.TYPE_ENUM):
            name = self.local(field.type_name)
            if name in entries:
                key, value = entries[name].field
                return f"`map<{self.scalar(key)}, {self.scalar(value)}>`"
            shown = f"[{name}](#{anchor(name)})" if not name.startswith(".") else f"`{name[1:]}`"
        else:
            shown = f"`{SCALARS[field.type]}`"
        if field.label == F.LABEL_REPEATED:
            return f"repeated {shown}"
        if field.proto3_optional:
            return f"optional {shown}"
        return shown

    def add(self, *text: str) -> None:
        self.lines.extend(text)

    def message(self, message: descriptor_pb2.DescriptorProto, path: tuple[int, ...],
                prefix: str = "") -> None:
        name = prefix + message.name
        entries = {f"{name}.{nested.name}": nested for nested in message.nested_type
                   if nested.options.map_entry}
        self.add(f"### {name}", "")
        if text := prose(self.comments.above(path)):
            self.add(text, "")
        if message.field:
            self.add("| field | type | number | description |", "| --- | --- | --- | --- |")
            for i, field in enumerate(message.field):
                described = cell(self.comments.above((*path, MESSAGE_FIELD, i)))
                self.add(f"| `{field.name}` | {self.type_of(field, entries)} | {field.number} "
                         f"| {described} |")
            self.add("")
        else:
            self.add("No fields.", "")
        for i, enum in enumerate(message.enum_type):
            self.enum(enum, (*path, MESSAGE_ENUM, i), f"{name}.")
        for i, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:
                self.message(nested, (*path, MESSAGE_NESTED, i), f"{name}.")

    def enum(self, enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...],
             prefix: str = "") -> None:
        self.add(f"### {prefix}{enum.name}", "")
        if text := prose(self.comments.above(path)):
            self.add(text, "")
        self.add("| value | number | description |", "| --- | --- | --- |")
        for i, value in enumerate(enum.value):
            described = cell(self.comments.above((*path, ENUM_VALUE, i)))
            self.add(f"| `{value.name}` | {value.number} | {described} |")
        self.add("")

    def render(self) -> str:
        f = self.file
        self.add(
            "# API reference",
            "",
            "<!-- Generated by `make proto` (proto/reference.py) from the proto's comments;",
            "     do not edit: tests/test_proto.py fails when it is stale. -->",
            "",
            textwrap.fill(
                f"Package `{f.package}`, file [`proto/{PROTO}`](../proto/{PROTO}). What each "
                "call is for, with examples, is in [api.md](api.md); this page is every method, "
                "message, field and enum value with the comment the proto gives it.", WIDTH,
                break_long_words=False, break_on_hyphens=False),
            "",
            "## Contents",
            "",
        )
        for service in f.service:
            self.add(f"- [Service {service.name}](#service-{anchor(service.name)})")
        self.add("- [Statuses and errors](#statuses-and-errors)", "- [Messages](#messages)")
        self.add(*(f"  - [{m.name}](#{anchor(m.name)})" for m in f.message_type))
        self.add("- [Enums](#enums)")
        self.add(*(f"  - [{e.name}](#{anchor(e.name)})" for e in f.enum_type), "")
        for i, service in enumerate(f.service):
            self.add(f"## Service {service.name}", "")
            if text := prose(self.comments.above((FILE_SERVICE, i))):
                self.add(text, "")
            for j, method in enumerate(service.method):
                request, response = self.local(method.input_type), self.local(method.output_type)
                self.add(f"### {method.name}", "",
                         f"`rpc {method.name}(`[`{request}`](#{anchor(request)})`) returns (`"
                         f"[`{response}`](#{anchor(response)})`)`", "")
                if text := prose(self.comments.above((FILE_SERVICE, i, SERVICE_METHOD, j))):
                    self.add(text, "")
        self.add("## Statuses and errors", "")
        for text in [*self.comments.detached((FILE_SYNTAX,)), self.comments.above((FILE_SYNTAX,))]:
            self.add(prose(text), "")
        self.add("## Messages", "")
        for i, message in enumerate(f.message_type):
            self.message(message, (FILE_MESSAGE, i))
        self.add("## Enums", "")
        for i, enum in enumerate(f.enum_type):
            self.enum(enum, (FILE_ENUM, i))
        return "\n".join(self.lines).rstrip("\n") + "\n"


def render() -> str:
    """docs/api-reference.md as it should be."""
    return Page(descriptor()).render()


if __name__ == "__main__":
    (Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE).write_text(render())
