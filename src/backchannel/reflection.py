"""Server reflection that shows the envelope's comments to grpcurl ``describe``.

The generated ``*_pb2`` modules carry descriptors without source info, so stock
reflection would serve the envelope without its comments. This servicer serves every
file as stock reflection does, but swaps in the documented descriptor of each file that
ships one (``backchannel/v1/envelope.binpb``, produced by ``scripts/gen_protos.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer


def documented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with comments, for backchannel's protos."""
    data = (resources.files("backchannel") / "v1" / "envelope.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {file.name: file.SerializeToString() for file in files}


class DocumentedReflection(ReflectionServicer):  # type: ignore[misc]
    """Stock reflection, with documented descriptors where we have them."""

    def __init__(self, service_names: Iterable[str], documented: dict[str, bytes]) -> None:
        super().__init__(tuple(service_names))
        self._documented = documented

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for index, serialized in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
                    if name in self._documented:
                        files[index] = self._documented[name]
            yield response


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for ``service_names`` (the reflection service itself included)."""
    names = [*service_names, reflection.SERVICE_NAME]
    servicer = DocumentedReflection(names, documented_files())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
