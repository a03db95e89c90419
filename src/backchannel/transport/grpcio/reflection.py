"""Server reflection that shows the envelope's comments to grpcurl ``describe``.

The generated ``*_pb2`` modules carry descriptors without source info, so stock
reflection would serve the envelope without its comments. This servicer serves every
file as stock reflection does, but swaps in the documented descriptor of each file that
ships one: ``backchannel/v1/envelope.binpb``, and for any other file, a ``NAME.binpb``
beside the imported ``NAME_pb2.py`` that describes it (``scripts/gen_protos.py`` writes
both, e.g. ``examples/notify/generated/demo/person.binpb``).

With a ``guard`` (the server's authenticator), each reflection stream must pass it first.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer


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


#: refuses a reflection stream (aborts its context) unless its metadata is accepted
Guard = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


class DocumentedReflection(ReflectionServicer):  # type: ignore[misc]
    """Stock reflection, with documented descriptors where we have them; behind
    ``guard`` when one is given."""

    def __init__(
        self, service_names: Iterable[str], documented: dict[str, bytes], guard: Guard | None = None
    ) -> None:
        super().__init__(tuple(service_names))
        self._documented: dict[str, bytes | None] = dict(documented)
        self._guard = guard

    def _documented_file(self, name: str) -> bytes | None:
        if name not in self._documented:
            self._documented[name] = documented_beside_module(name)
        return self._documented[name]

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        if self._guard is not None:
            await self._guard(context)
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for index, serialized in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
                    documented = self._documented_file(name)
                    if documented is not None:
                        files[index] = documented
            yield response


def enable(
    server: grpc.aio.Server, service_names: Iterable[str], guard: Guard | None = None
) -> None:
    """Serve reflection for ``service_names`` (the reflection service itself included),
    each stream first passing ``guard`` when one is given."""
    names = [*service_names, reflection.SERVICE_NAME]
    servicer = DocumentedReflection(names, documented_files(), guard)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
