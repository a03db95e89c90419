"""The interface shared by the forward-call example's provider and consumer."""

import backchannel


@backchannel.interface("com.example.Calculator")
class Calculator:
    """A provider that adds, divides and greets."""

    def add(self, a: int, b: int) -> int:
        """a + b."""
        raise NotImplementedError

    def divide(self, a: float, b: float) -> float:
        """a / b; raises ZeroDivisionError on the consumer when b is 0."""
        raise NotImplementedError

    def greet(self, name: str, greeting: str = "Hello") -> str:
        """A greeting for name."""
        raise NotImplementedError
