"""Serve the Calculator until killed: python examples/forward/provider.py [HOST:PORT]."""

import sys

from service import Calculator

import backchannel


class CalculatorImpl:
    """Sync and async methods can be mixed in one implementation."""

    def add(self, a: int, b: int) -> int:
        return a + b

    async def divide(self, a: float, b: float) -> float:
        return a / b

    def greet(self, name: str, greeting: str = "Hello") -> str:
        return f"{greeting}, {name}!"


def main() -> None:
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:0"
    server = backchannel.Server(address, application="forward-provider")
    server.export(Calculator, CalculatorImpl(), group="demo", version="1.0.0")
    server.start()
    print(f"listening on {server.address}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=1)


if __name__ == "__main__":
    main()
