from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StoredBlock(_message.Message):
    __slots__ = ("id", "codec", "raw_size", "payload", "unit_digests", "partial")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    UNIT_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    codec: int
    raw_size: int
    payload: bytes
    unit_digests: bytes
    partial: bool
    def __init__(self, id: _Optional[bytes] = ..., codec: _Optional[int] = ..., raw_size: _Optional[int] = ..., payload: _Optional[bytes] = ..., unit_digests: _Optional[bytes] = ..., partial: _Optional[bool] = ...) -> None: ...

class BlockBatch(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[StoredBlock]
    def __init__(self, blocks: _Optional[_Iterable[_Union[StoredBlock, _Mapping]]] = ...) -> None: ...

class HasBlocksRequest(_message.Message):
    __slots__ = ("ids", "version")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ids: bytes
    version: str
    def __init__(self, ids: _Optional[bytes] = ..., version: _Optional[str] = ...) -> None: ...

class HasBlocksResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: bytes
    def __init__(self, present: _Optional[bytes] = ...) -> None: ...

class FetchBlocksRequest(_message.Message):
    __slots__ = ("ids", "version", "unit_size", "unit_masks", "wait_ms")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNIT_SIZE_FIELD_NUMBER: _ClassVar[int]
    UNIT_MASKS_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    ids: bytes
    version: str
    unit_size: int
    unit_masks: _containers.RepeatedScalarFieldContainer[bytes]
    wait_ms: int
    def __init__(self, ids: _Optional[bytes] = ..., version: _Optional[str] = ..., unit_size: _Optional[int] = ..., unit_masks: _Optional[_Iterable[bytes]] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class PushBlocksResponse(_message.Message):
    __slots__ = ("accepted", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: bytes
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[bytes] = ...) -> None: ...
