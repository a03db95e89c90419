"""A failed Invoke as a gRPC status: its code, its message and the
``grpc-status-details-bin`` trailer, a ``google.rpc.Status`` whose details hold the call's
:class:`~backchannel.v1.envelope_pb2.Error` (packed as ``google.protobuf.Any``); and that
Error read back from the trailer.

``google.rpc.Status`` is built here in a private descriptor pool (three fields, fixed by
gRPC) rather than taken from googleapis-common-protos: no dependency for twenty lines, and
nothing is registered in the default pool, so an application that imports
``google.rpc.status_pb2`` itself meets no clash. grpcurl decodes the trailer with its own
copy of the type and resolves the Error through reflection.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from backchannel.transport.seam import Code
from backchannel.v1 import envelope_pb2 as pb

__all__ = ["DETAILS_KEY", "MAX_DETAILS", "MAX_MESSAGE", "error_of", "failure"]

#: the trailer gRPC carries a status's details in
DETAILS_KEY = "grpc-status-details-bin"
#: the most bytes of ``google.rpc.Status`` sent: trailers are metadata, and a grpcio
#: client refuses more than 8 KiB of it (base64 makes these 4 KiB); past it the Error's
#: traceback, then its args and attributes, then its message's tail are left out
MAX_DETAILS = 3072
#: the most bytes (UTF-8) of the status message, ``grpc-message`` (percent-encoded on the
#: wire: up to three times as long)
MAX_MESSAGE = 600
#: the Error's type URL in the details (grpcurl resolves it through reflection)
ERROR_TYPE_URL = "type.googleapis.com/" + pb.Error.DESCRIPTOR.full_name
#: the codes an Error may travel with: any but OK (an Error with code OK says UNKNOWN)
_CODES = frozenset(int(code) for code in Code) - {0}


def _status_class() -> Any:
    """``google.rpc.Status`` (code, message, repeated Any details), in a pool of its own."""
    pool = descriptor_pool.DescriptorPool()
    any_file = descriptor_pb2.FileDescriptorProto()
    any_pb2.DESCRIPTOR.CopyToProto(any_file)
    pool.Add(any_file)
    status_file = descriptor_pb2.FileDescriptorProto(
        name="google/rpc/status.proto",
        package="google.rpc",
        dependency=[any_file.name],
        syntax="proto3",
    )
    field = descriptor_pb2.FieldDescriptorProto
    status = status_file.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    status.field.add(
        name="details",
        number=3,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".google.protobuf.Any",
    )
    pool.Add(status_file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))


_Status = _status_class()


def _cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes, cut on a character, marked when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def _status(code: Code, message: str, error: pb.Error) -> bytes:
    status = _Status(code=int(code), message=message)
    status.details.add(type_url=ERROR_TYPE_URL, value=error.SerializeToString())
    data: bytes = status.SerializeToString()
    return data


def failure(error: pb.Error) -> tuple[Code, str, bytes]:
    """The status a failed Invoke ends with: its code (the Error's), its message
    (``"type: message"``, as the command line prints an error) and the details trailer's
    bytes, at most :data:`MAX_DETAILS` of them."""
    code = Code(error.code) if int(error.code) in _CODES else Code.UNKNOWN
    message = _cut(f"{error.type}: {error.message}" if error.type else error.message, MAX_MESSAGE)
    details = _status(code, message, error)
    if len(details) <= MAX_DETAILS:  # the usual case: no copy
        return code, message, details
    smaller = pb.Error()
    smaller.CopyFrom(error)
    smaller.traceback = ""
    for shrink in (_drop_values, _cut_message):
        details = _status(code, message, smaller)
        if len(details) <= MAX_DETAILS:
            break
        shrink(smaller)
    return code, message, _status(code, message, smaller)


def _drop_values(error: pb.Error) -> None:
    del error.args[:]
    error.attributes.clear()


def _cut_message(error: pb.Error) -> None:
    error.message = _cut(error.message, MAX_MESSAGE)
    error.type = _cut(error.type, 200)


def error_of(details: bytes | None) -> pb.Error | None:
    """The Error a details trailer holds; None when there is none (or it is no Status)."""
    if not details:
        return None
    try:
        status = _Status.FromString(details)
        for detail in status.details:
            if detail.type_url == ERROR_TYPE_URL:
                return pb.Error.FromString(detail.value)
    except DecodeError:
        return None
    return None
