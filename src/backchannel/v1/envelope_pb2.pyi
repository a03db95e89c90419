from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[Code]
    CANCELLED: _ClassVar[Code]
    UNKNOWN: _ClassVar[Code]
    INVALID_ARGUMENT: _ClassVar[Code]
    DEADLINE_EXCEEDED: _ClassVar[Code]
    NOT_FOUND: _ClassVar[Code]
    RESOURCE_EXHAUSTED: _ClassVar[Code]
    FAILED_PRECONDITION: _ClassVar[Code]
    UNIMPLEMENTED: _ClassVar[Code]
    INTERNAL: _ClassVar[Code]
    UNAVAILABLE: _ClassVar[Code]
OK: Code
CANCELLED: Code
UNKNOWN: Code
INVALID_ARGUMENT: Code
DEADLINE_EXCEEDED: Code
NOT_FOUND: Code
RESOURCE_EXHAUSTED: Code
FAILED_PRECONDITION: Code
UNIMPLEMENTED: Code
INTERNAL: Code
UNAVAILABLE: Code

class Frame(_message.Message):
    __slots__ = ("hello", "welcome", "call", "result", "cancel", "release", "go_away", "batch", "fault", "multicast")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    GO_AWAY_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    MULTICAST_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    welcome: Welcome
    call: Call
    result: Result
    cancel: Cancel
    release: Release
    go_away: GoAway
    batch: Batch
    fault: Fault
    multicast: Multicast
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., call: _Optional[_Union[Call, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., go_away: _Optional[_Union[GoAway, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., fault: _Optional[_Union[Fault, _Mapping]] = ..., multicast: _Optional[_Union[Multicast, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "application", "max_calls_in_flight", "max_message_size", "accepts_multicast")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_MULTICAST_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    application: str
    max_calls_in_flight: int
    max_message_size: int
    accepts_multicast: bool
    def __init__(self, protocol_version: _Optional[int] = ..., application: _Optional[str] = ..., max_calls_in_flight: _Optional[int] = ..., max_message_size: _Optional[int] = ..., accepts_multicast: _Optional[bool] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "application", "services", "max_calls_in_flight", "max_message_size")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    application: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceInfo]
    max_calls_in_flight: int
    max_message_size: int
    def __init__(self, protocol_version: _Optional[int] = ..., application: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceInfo, _Mapping]]] = ..., max_calls_in_flight: _Optional[int] = ..., max_message_size: _Optional[int] = ...) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("name", "group", "version", "methods", "callbacks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CALLBACKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    group: str
    version: str
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    callbacks: int
    def __init__(self, name: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., callbacks: _Optional[int] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "parameters", "required", "callback_arguments", "remover_arguments", "one_way", "parameter_types", "callback_interfaces")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    REMOVER_ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    ONE_WAY_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_TYPES_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_INTERFACES_FIELD_NUMBER: _ClassVar[int]
    name: str
    parameters: _containers.RepeatedScalarFieldContainer[str]
    required: int
    callback_arguments: _containers.RepeatedScalarFieldContainer[int]
    remover_arguments: _containers.RepeatedScalarFieldContainer[int]
    one_way: bool
    parameter_types: _containers.RepeatedScalarFieldContainer[str]
    callback_interfaces: _containers.RepeatedCompositeFieldContainer[CallbackInterface]
    def __init__(self, name: _Optional[str] = ..., parameters: _Optional[_Iterable[str]] = ..., required: _Optional[int] = ..., callback_arguments: _Optional[_Iterable[int]] = ..., remover_arguments: _Optional[_Iterable[int]] = ..., one_way: _Optional[bool] = ..., parameter_types: _Optional[_Iterable[str]] = ..., callback_interfaces: _Optional[_Iterable[_Union[CallbackInterface, _Mapping]]] = ...) -> None: ...

class CallbackInterface(_message.Message):
    __slots__ = ("argument", "name", "methods")
    ARGUMENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    argument: int
    name: str
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    def __init__(self, argument: _Optional[int] = ..., name: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ...) -> None: ...

class Call(_message.Message):
    __slots__ = ("id", "service", "group", "version", "method", "args", "callback_id", "parent_id", "one_way", "json_args", "trace_context", "attachments")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AttachmentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    ONE_WAY_FIELD_NUMBER: _ClassVar[int]
    JSON_ARGS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    service: str
    group: str
    version: str
    method: str
    args: _containers.RepeatedCompositeFieldContainer[Value]
    callback_id: int
    parent_id: int
    one_way: bool
    json_args: str
    trace_context: _containers.ScalarMap[str, str]
    attachments: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., service: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., method: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., callback_id: _Optional[int] = ..., parent_id: _Optional[int] = ..., one_way: _Optional[bool] = ..., json_args: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., attachments: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Multicast(_message.Message):
    __slots__ = ("call", "targets")
    CALL_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    call: Call
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, call: _Optional[_Union[Call, _Mapping]] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("id", "callback_id", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    id: int
    callback_id: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., callback_id: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("id", "value", "error", "json")
    ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    id: int
    value: Value
    error: Error
    json: str
    def __init__(self, id: _Optional[int] = ..., value: _Optional[_Union[Value, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., json: _Optional[str] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: int
    reason: str
    def __init__(self, id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("callback_id",)
    CALLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    callback_id: int
    def __init__(self, callback_id: _Optional[int] = ...) -> None: ...

class GoAway(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class Fault(_message.Message):
    __slots__ = ("message", "call_id")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    message: str
    call_id: int
    def __init__(self, message: _Optional[str] = ..., call_id: _Optional[int] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("null_value", "bool_value", "int_value", "double_value", "string_value", "bytes_value", "list_value", "map_value", "message_value", "callback_value")
    NULL_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAP_VALUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_VALUE_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_VALUE_FIELD_NUMBER: _ClassVar[int]
    null_value: _struct_pb2.NullValue
    bool_value: bool
    int_value: int
    double_value: float
    string_value: str
    bytes_value: bytes
    list_value: ValueList
    map_value: ValueMap
    message_value: _any_pb2.Any
    callback_value: CallbackRef
    def __init__(self, null_value: _Optional[_Union[_struct_pb2.NullValue, str]] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., double_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bytes_value: _Optional[bytes] = ..., list_value: _Optional[_Union[ValueList, _Mapping]] = ..., map_value: _Optional[_Union[ValueMap, _Mapping]] = ..., message_value: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., callback_value: _Optional[_Union[CallbackRef, _Mapping]] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class ValueMap(_message.Message):
    __slots__ = ("entries",)
    class EntriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.MessageMap[str, Value]
    def __init__(self, entries: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class CallbackRef(_message.Message):
    __slots__ = ("id", "interface")
    ID_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    id: int
    interface: str
    def __init__(self, id: _Optional[int] = ..., interface: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "type", "message", "args", "traceback", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    code: Code
    type: str
    message: str
    args: _containers.RepeatedCompositeFieldContainer[Value]
    traceback: str
    attributes: _containers.MessageMap[str, Value]
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., type: _Optional[str] = ..., message: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., traceback: _Optional[str] = ..., attributes: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("application", "protocol_version", "services")
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    application: str
    protocol_version: int
    services: _containers.RepeatedCompositeFieldContainer[ServiceInfo]
    def __init__(self, application: _Optional[str] = ..., protocol_version: _Optional[int] = ..., services: _Optional[_Iterable[_Union[ServiceInfo, _Mapping]]] = ...) -> None: ...
