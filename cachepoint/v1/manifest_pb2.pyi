from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntryType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTRY_TYPE_UNSPECIFIED: _ClassVar[EntryType]
    ENTRY_TYPE_FILE: _ClassVar[EntryType]
    ENTRY_TYPE_DIRECTORY: _ClassVar[EntryType]
    ENTRY_TYPE_SYMLINK: _ClassVar[EntryType]
    ENTRY_TYPE_WHITEOUT: _ClassVar[EntryType]

class Chunking(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNKING_FIXED: _ClassVar[Chunking]
    CHUNKING_CONTENT: _ClassVar[Chunking]
ENTRY_TYPE_UNSPECIFIED: EntryType
ENTRY_TYPE_FILE: EntryType
ENTRY_TYPE_DIRECTORY: EntryType
ENTRY_TYPE_SYMLINK: EntryType
ENTRY_TYPE_WHITEOUT: EntryType
CHUNKING_FIXED: Chunking
CHUNKING_CONTENT: Chunking

class FileEntry(_message.Message):
    __slots__ = ("path", "type", "mode", "size", "mtime_ns", "symlink_target", "blocks", "extents")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    SYMLINK_TARGET_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    path: str
    type: EntryType
    mode: int
    size: int
    mtime_ns: int
    symlink_target: str
    blocks: bytes
    extents: bytes
    def __init__(self, path: _Optional[str] = ..., type: _Optional[_Union[EntryType, str]] = ..., mode: _Optional[int] = ..., size: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., symlink_target: _Optional[str] = ..., blocks: _Optional[bytes] = ..., extents: _Optional[bytes] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("format", "block_size", "single_file", "entries", "chunking", "unit_size", "chunk_average")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SINGLE_FILE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    UNIT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    format: int
    block_size: int
    single_file: bool
    entries: _containers.RepeatedCompositeFieldContainer[FileEntry]
    chunking: Chunking
    unit_size: int
    chunk_average: int
    def __init__(self, format: _Optional[int] = ..., block_size: _Optional[int] = ..., single_file: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., chunking: _Optional[_Union[Chunking, str]] = ..., unit_size: _Optional[int] = ..., chunk_average: _Optional[int] = ...) -> None: ...
