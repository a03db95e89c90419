"""Default time limits."""

#: Dubbo's default call timeout, in seconds: forward calls and callback calls alike
DEFAULT_TIMEOUT = 1.0
