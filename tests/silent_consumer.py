"""A consumer that sends calls and does not read: ``python silent_consumer.py ADDRESS
SERVICE METHOD COUNT SIZE``.

A raw Connect stream: a hello, then COUNT calls SERVICE.METHOD(SIZE); prints ``sent``
once all are handed to gRPC (its writes block while the provider stops reading). It reads
nothing until a line arrives on stdin; then it reads to the end and prints ``results N``
and how the stream ended (``status OK`` or ``status CODE DETAILS``).
"""

import sys
import threading
from collections.abc import Iterator

import grpc

from backchannel.v1 import envelope_pb2 as pb


def main(address: str, service: str, method: str, count: int, size: int) -> None:
    channel = grpc.insecure_channel(address)
    connect = channel.stream_stream(
        "/backchannel.v1.Envelope/Connect",
        request_serializer=pb.Frame.SerializeToString,
        response_deserializer=pb.Frame.FromString,
    )
    done = threading.Event()

    def frames() -> Iterator[pb.Frame]:
        yield pb.Frame(hello=pb.Hello(protocol_version=1, application="silent"))
        for call_id in range(1, count + 1):
            arg = pb.Value(int_value=size)
            yield pb.Frame(call=pb.Call(id=call_id, service=service, method=method, args=[arg]))
        print("sent", flush=True)
        done.wait()  # keep the stream open (no half-close) until everything is read

    responses = connect(frames())
    sys.stdin.readline()  # not a byte is read before this
    results = 0
    try:
        for frame in responses:
            inner = frame.batch.frames if frame.WhichOneof("kind") == "batch" else [frame]
            results += sum(1 for each in inner if each.WhichOneof("kind") == "result")
            if results >= count:
                break
        status = "status OK"
    except grpc.RpcError as exc:
        status = f"status {exc.code().name} {exc.details()}"
    print(f"results {results}", flush=True)
    print(status, flush=True)
    done.set()
    channel.close()


if __name__ == "__main__":
    address, service, method, count, size = sys.argv[1:6]
    main(address, service, method, int(count), int(size))
