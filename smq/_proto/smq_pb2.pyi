from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLatestOffsetRequest(_message.Message):
    __slots__ = ("topic",)
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    topic: str
    def __init__(self, topic: _Optional[str] = ...) -> None: ...

class GetLatestOffsetResponse(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class GetEarliestOffsetRequest(_message.Message):
    __slots__ = ("topic",)
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    topic: str
    def __init__(self, topic: _Optional[str] = ...) -> None: ...

class GetEarliestOffsetResponse(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class CreateTopicRequest(_message.Message):
    __slots__ = ("topic",)
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    topic: str
    def __init__(self, topic: _Optional[str] = ...) -> None: ...

class CreateTopicResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProduceRequest(_message.Message):
    __slots__ = ("topic", "message")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    topic: str
    message: bytes
    def __init__(self, topic: _Optional[str] = ..., message: _Optional[bytes] = ...) -> None: ...

class ProduceResponse(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class ConsumeRequest(_message.Message):
    __slots__ = ("topic", "offset")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    topic: str
    offset: int
    def __init__(self, topic: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ConsumeResponse(_message.Message):
    __slots__ = ("message", "offset")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    message: bytes
    offset: int
    def __init__(self, message: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class DeleteUntilOffsetRequest(_message.Message):
    __slots__ = ("topic", "offset")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    topic: str
    offset: int
    def __init__(self, topic: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DeleteUntilOffsetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RetrievedMessage(_message.Message):
    __slots__ = ("message", "offset")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    message: bytes
    offset: int
    def __init__(self, message: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class BulkRetrieveRequest(_message.Message):
    __slots__ = ("topic", "start_offset", "limit")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    topic: str
    start_offset: int
    limit: int
    def __init__(self, topic: _Optional[str] = ..., start_offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class BulkRetrieveResponse(_message.Message):
    __slots__ = ("messages", "count", "next_offset")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[RetrievedMessage]
    count: int
    next_offset: int
    def __init__(self, messages: _Optional[_Iterable[_Union[RetrievedMessage, _Mapping]]] = ..., count: _Optional[int] = ..., next_offset: _Optional[int] = ...) -> None: ...
