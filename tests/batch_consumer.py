"""A raw consumer in a process of its own that sends one huge Batch of calls.

Argument: the provider's address. After the handshake it prints ``ready`` and waits for a
line on stdin; then it sends one Batch of 150,000 calls (1,000 ``wait(30)`` calls that
hold the provider's in-flight slots, then 149,000 short ``echo()`` calls past the limit),
reads until 149,000 answers have come, and prints how many were RESOURCE_EXHAUSTED
errors and how many frames of any other kind came back. A process of its own, so its
work (reading 25 MB of answers) does not compete for the GIL with the provider's loop.
"""

import asyncio
import sys

import grpc

from backchannel.v1 import envelope_pb2 as pb

CALLS = 150_000
HELD = 1_000


def the_batch() -> bytes:
    hold = pb.Call(service="test.Echo", method="wait", args=[pb.Value(double_value=30)])
    short = pb.Call(service="test.Echo", method="echo")
    frames = []
    for i in range(1, CALLS + 1):
        call = hold if i <= HELD else short
        call.id = i
        frames.append(pb.Frame(call=call))
    return pb.Frame(batch=pb.Batch(frames=frames)).SerializeToString()


async def main(address: str) -> None:
    data = the_batch()
    channel = grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 8 << 20)]
    )
    stream = channel.stream_stream(
        "/backchannel.v1.Envelope/Connect",
        request_serializer=lambda m: m,
        response_deserializer=pb.Frame.FromString,
    )()
    hello = pb.Frame(hello=pb.Hello(protocol_version=1, application="batch"))
    await stream.write(hello.SerializeToString())
    assert (await stream.read()).HasField("welcome")
    print(len(data), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await stream.write(data)
    refused = other = 0
    while refused + other < CALLS - HELD:
        frame = await asyncio.wait_for(stream.read(), 30)
        for one in frame.batch.frames if frame.HasField("batch") else [frame]:
            if one.HasField("result") and one.result.error.code == pb.RESOURCE_EXHAUSTED:
                refused += 1
            else:
                other += 1
    print(refused, other, flush=True)
    stream.cancel()
    await channel.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
