"""The exceptions backchannel raises.

::

    BackchannelError
    ├── ProtocolError                 a frame broke the protocol
    │   ├── LocalProtocolError        ... and it was ours (a bug in the caller or the library)
    │   └── RemoteProtocolError       ... and it was the peer's
    ├── CodecError                    a value could not be encoded or decoded
    │   ├── EncodeError (TypeError)   not a value the wire can carry; names the argument
    │   └── DecodeError (ValueError)  a Value that makes no sense
    ├── TransportError (ConnectionError)
    │   ├── StreamBroken              the Connect stream ended under a pending call
    │   ├── CallbackGone              the callback instance was released or its stream ended
    │   ├── ChannelClosed             the client or server was closed
    │   ├── CredentialsNotSent        the client would not send its token to that address
    │   └── Unauthenticated (PermissionError)  the provider refused the consumer's credentials
    └── CallError                     a call failed; the remote side answered
        ├── RemoteError               the remote method raised something not on the allow-list
        ├── CallCancelled
        ├── DeadlineExceeded (TimeoutError)
        ├── InvalidArguments (TypeError)
        ├── ServiceNotFound
        ├── MethodNotFound
        ├── TooManyCallbacks
        ├── MessageTooLarge               a call or result over max_message_size
        ├── UnknownCallback (LookupError)   removing what was never added
        └── ShuttingDown

Foreign errors (grpc's) are translated in exactly one place, the transport, and chained
with ``raise ... from exc``.
"""

from __future__ import annotations


class BackchannelError(Exception):
    """Base class of every error backchannel raises itself."""


class ProtocolError(BackchannelError):
    """A frame broke the protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class CodecError(BackchannelError):
    """A value could not be encoded or decoded."""


class EncodeError(CodecError, TypeError):
    """A Python object cannot travel as a Value; the message names where it was."""


class DecodeError(CodecError, ValueError):
    """A received Value could not be turned back into a Python object."""


class TransportError(BackchannelError, ConnectionError):
    """The connection to the peer failed or was closed."""


class StreamBroken(TransportError):
    """The Connect stream ended while calls were pending on it."""


class CallbackGone(TransportError):
    """The callback instance was released, or the stream that carried it ended."""


class ChannelClosed(TransportError):
    """The client or server was closed; no more calls can be made on it."""


class CredentialsNotSent(TransportError):
    """The client would not send its token (or ``authorization`` metadata) to a provider:
    the connection would be plaintext and the address is not loopback.

    Nothing was sent to that address. The message names it and the settings that allow
    it (``credentials=`` for TLS, or ``send_token_over_plaintext=True``)."""


class Unauthenticated(TransportError, PermissionError):
    """The provider refused this consumer: missing or invalid credentials."""


class CallError(BackchannelError):
    """A call reached the remote side and failed there."""


class RemoteError(CallError):
    """The remote method raised an exception this side does not know.

    Keeps the remote exception's type name and message.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        #: the remote exception's type name, e.g. ``"myapp.OutOfStock"``
        self.type_name = type_name
        #: the remote exception's message
        self.remote_message = message
        #: the remote traceback, when the provider opted in to sending it
        self.remote_traceback = traceback


class CallCancelled(CallError):
    """The call was cancelled before it finished."""


class DeadlineExceeded(CallError, TimeoutError):
    """The call did not finish before its timeout."""


class InvalidArguments(CallError, TypeError):
    """The arguments do not fit the method's parameters."""


class ServiceNotFound(CallError):
    """No service with that name, group and version is exported."""


class MethodNotFound(CallError):
    """The service has no method of that name."""


class TooManyCallbacks(CallError):
    """The service's limit of live callback instances on this stream was reached."""


class MessageTooLarge(CallError):
    """A call or its result is larger than the message size limit."""


class UnknownCallback(CallError, LookupError):
    """The object is not a live callback instance on this stream (never added, or removed)."""


class ShuttingDown(CallError):
    """The peer is shutting down and accepts no new calls."""


def forget_frames(error: BaseException | None) -> None:
    """Drop the tracebacks of ``error`` and of the errors it was raised from (or
    during). A stream's failure is kept (a session's ``cause``, an attempt's outcome)
    long after it was raised, and its traceback holds the frames it passed through: the
    failed stream's reader, its session, its gRPC call, a reference cycle that only the
    cyclic garbage collector frees. A thousand unreachable providers then bring full
    collections of 0.2-0.3 s on the event loop. The messages still say what failed."""
    for _ in range(8):  # a chain is a few errors long (and could loop)
        if error is None:
            return
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
