"""The seed's TEST CASE: python examples/notify/consumer.py HOST:PORT.

``get`` is configured as ``<dubbo:method name="get" async="true"
onreturn="demoCallback.onreturn" onthrow="demoCallback.onthrow"/>``: the call returns a
future at once and the hooks hear the outcome. Then the three other modes of the seed
run once each. Exits 0 when every step saw what it should, within 2 s each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys

from notify_service import IDemoService, NotifyImpl

import backchannel
from backchannel import Method

WAIT = 2.0


def check(ok: bool, what: str) -> None:
    """Stop the example with a message when a step did not see what it should."""
    if not ok:
        sys.exit(f"FAILED: {what}")


def seed_test_case(client: backchannel.Client) -> None:
    """Asynchronous callback mode: async=true onreturn=... onthrow=..."""
    notify = NotifyImpl()
    demo_service = client.reference(
        IDemoService,
        group="cn",
        version="1.0.0",
        methods=[Method("get", async_=True, onreturn=notify.onreturn, onthrow=notify.onthrow)],
    )
    request_id = 2
    ret = demo_service.get(request_id)
    check(isinstance(ret, concurrent.futures.Future), "get(2) returns a future at once")
    print(f"get({request_id}) returned at once: {ret!r}", flush=True)
    check(notify.wait_for(notify.ret, request_id, WAIT), "onreturn ran within 2 s")
    check(notify.ret[request_id].id == request_id, "onreturn got Person 2")
    demo_service.get(11)
    check(notify.wait_for(notify.errors, 11, WAIT), "onthrow ran within 2 s")
    check(isinstance(notify.errors[11], LookupError), "onthrow got the provider's LookupError")


def other_modes(client: backchannel.Client) -> None:
    """Synchronous callback, asynchronous without callback, synchronous without callback."""
    notify = NotifyImpl()
    sync_callback = client.reference(
        IDemoService,
        group="cn",
        version="1.0.0",
        methods=[Method("get", onreturn=notify.onreturn, onthrow=notify.onthrow)],
    )
    person = sync_callback.get(3)  # blocks; onreturn has run already
    check(person.id == 3 and notify.ret.get(3) == person, "onreturn ran before get(3) returned")
    print(f"sync + callback: get(3) -> {person.name!r}, onreturn saw it first", flush=True)

    async_only = client.reference(
        IDemoService, group="cn", version="1.0.0", methods=[Method("get", async_=True)]
    )
    future = async_only.get(4)
    print(f"async only: get(4) -> {future.result(WAIT).name!r} via the future", flush=True)

    sync_only = client.reference(IDemoService, group="cn", version="1.0.0")
    print(f"sync only: get(5) -> {sync_only.get(5).name!r}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    options = parser.parse_args()
    with backchannel.Client(options.address, application="rpc-callback-demo") as client:
        seed_test_case(client)
        other_modes(client)
    print("all four modes behaved", flush=True)


if __name__ == "__main__":
    main()
