"""Server reflection (for grpcurl), whatever transport serves it: the answers to each
request of ``grpc.reflection.v1alpha.ServerReflection`` over the default descriptor pool,
with the documented descriptor of each file that ships one, so ``describe`` shows the
envelope's comments.

The generated ``*_pb2`` modules carry descriptors without source info: each file's
documented descriptor is ``backchannel/v1/envelope.binpb``, or a ``NAME.binpb`` beside
the imported ``NAME_pb2.py`` that describes it (``scripts/gen_protos.py`` writes both,
e.g. ``examples/notify/generated/demo/person.binpb``). grpc-free: ``grpc_reflection``'s
messages are plain protobuf.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection_pb2

#: the reflection service's own name
SERVICE_NAME = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name

_NOT_FOUND = (5, b"NOT_FOUND")
_INVALID_ARGUMENT = (3, b"INVALID_ARGUMENT")


def documented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with comments, for backchannel's protos."""
    data = (resources.files("backchannel") / "v1" / "envelope.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {file.name: file.SerializeToString() for file in files}


def documented_beside_module(name: str) -> bytes | None:
    """The documented descriptor of proto file ``name`` from the ``.binpb`` beside its
    imported ``_pb2`` module, or None when there is none (or it describes another file)."""
    for module in list(sys.modules.values()):
        found = getattr(module, "DESCRIPTOR", None)
        path = getattr(module, "__file__", None) or ""
        if not isinstance(found, descriptor.FileDescriptor) or found.name != name:
            continue
        if not path.endswith("_pb2.py"):
            continue
        binpb = Path(path[: -len("_pb2.py")] + ".binpb")
        try:
            files = descriptor_pb2.FileDescriptorSet.FromString(binpb.read_bytes()).file
        except (OSError, DecodeError):
            return None
        for file in files:
            if file.name == name:
                return file.SerializeToString()
    return None


class Reflection:
    """Answers reflection requests for ``service_names`` (grpc_reflection's stock
    answers, documented descriptors swapped in)."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self._service_names = tuple(sorted({*service_names, SERVICE_NAME}))
        self._pool = descriptor_pool.Default()
        self._documented: dict[str, bytes | None] = dict(documented_files())

    def documented(self, name: str) -> bytes | None:
        """The documented descriptor of file ``name``, when it ships one."""
        if name not in self._documented:
            self._documented[name] = documented_beside_module(name)
        return self._documented[name]

    def respond(
        self, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse:
        """The answer to one request."""
        pool = self._pool
        kind = request.WhichOneof("message_request")
        try:
            if kind == "file_by_filename":
                return self._files(request, pool.FindFileByName(request.file_by_filename))
            if kind == "file_containing_symbol":
                symbol = request.file_containing_symbol
                return self._files(request, pool.FindFileContainingSymbol(symbol))
            if kind == "file_containing_extension":
                wanted = request.file_containing_extension
                message = pool.FindMessageTypeByName(wanted.containing_type)
                extension = pool.FindExtensionByNumber(message, wanted.extension_number)
                return self._files(request, pool.FindFileContainingSymbol(extension.full_name))
            if kind == "all_extension_numbers_of_type":
                message = pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(extension.number for extension in pool.FindAllExtensions(message))
                return reflection_pb2.ServerReflectionResponse(
                    all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers
                    ),
                    original_request=request,
                )
        except KeyError:
            return _error(request, _NOT_FOUND)
        if kind == "list_services":
            return reflection_pb2.ServerReflectionResponse(
                list_services_response=reflection_pb2.ListServiceResponse(
                    service=[
                        reflection_pb2.ServiceResponse(name=name) for name in self._service_names
                    ]
                ),
                original_request=request,
            )
        return _error(request, _INVALID_ARGUMENT)

    def _files(
        self, request: reflection_pb2.ServerReflectionRequest, file: descriptor.FileDescriptor
    ) -> reflection_pb2.ServerReflectionResponse:
        """The file and every file it depends on, documented where we can."""
        seen: dict[str, descriptor.FileDescriptor] = {}
        _collect(file, seen)
        serialized = []
        for name, one in seen.items():
            documented = self.documented(name)
            if documented is None:
                proto = descriptor_pb2.FileDescriptorProto()
                one.CopyToProto(proto)
                documented = proto.SerializeToString()
            serialized.append(documented)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=serialized
            ),
            original_request=request,
        )


def _collect(file: descriptor.FileDescriptor, seen: dict[str, descriptor.FileDescriptor]) -> None:
    """``file`` and its dependencies, depth first (as stock reflection orders them)."""
    seen[file.name] = file
    for dependency in file.dependencies:
        if dependency.name not in seen:
            _collect(dependency, seen)


def _error(
    request: reflection_pb2.ServerReflectionRequest, error: tuple[int, bytes]
) -> reflection_pb2.ServerReflectionResponse:
    return reflection_pb2.ServerReflectionResponse(
        error_response=reflection_pb2.ErrorResponse(
            error_code=error[0], error_message=error[1].decode()
        ),
        original_request=request,
    )
