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
ENTRY_TYPE_UNSPECIFIED: EntryType
ENTRY_TYPE_FILE: EntryType
ENTRY_TYPE_DIRECTORY: EntryType
ENTRY_TYPE_SYMLINK: EntryType
ENTRY_TYPE_WHITEOUT: EntryType

class FileEntry(_message.Message):
    __slots__ = ("path", "type", "mode", "size", "mtime_ns", "symlink_target", "blocks")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    SYMLINK_TARGET_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    path: str
    type: EntryType
    mode: int
    size: int
    mtime_ns: int
    symlink_target: str
    blocks: bytes
    def __init__(self, path: _Optional[str] = ..., type: _Optional[_Union[EntryType, str]] = ..., mode: _Optional[int] = ..., size: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., symlink_target: _Optional[str] = ..., blocks: _Optional[bytes] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("format", "block_size", "single_file", "entries")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SINGLE_FILE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    format: int
    block_size: int
    single_file: bool
    entries: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, format: _Optional[int] = ..., block_size: _Optional[int] = ..., single_file: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...
