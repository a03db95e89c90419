"""Call the Calculator: python examples/forward/consumer.py HOST:PORT."""

import sys

from service import Calculator

import backchannel


def main() -> None:
    with backchannel.Client(sys.argv[1], application="forward-consumer") as client:
        calc = client.reference(Calculator, group="demo", version="1.0.0")
        print("add(2, 3) =", calc.add(2, 3))
        print("greet('Dubbo') =", calc.greet("Dubbo"))
        print("greet('grpc', greeting='Hi') =", calc.greet("grpc", greeting="Hi"))
        try:
            calc.divide(1, 0)
        except ZeroDivisionError as exc:
            print("divide(1, 0) raised ZeroDivisionError:", exc)


if __name__ == "__main__":
    main()
