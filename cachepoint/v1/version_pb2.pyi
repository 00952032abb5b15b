from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYER_KIND_UNSPECIFIED: _ClassVar[LayerKind]
    LAYER_KIND_OS: _ClassVar[LayerKind]
    LAYER_KIND_APP: _ClassVar[LayerKind]
    LAYER_KIND_USER: _ClassVar[LayerKind]
LAYER_KIND_UNSPECIFIED: LayerKind
LAYER_KIND_OS: LayerKind
LAYER_KIND_APP: LayerKind
LAYER_KIND_USER: LayerKind

class VersionInfo(_message.Message):
    __slots__ = ("layer", "number", "parent", "created_ns", "author", "device", "message", "manifest_digest", "kind", "logical_bytes", "restored_from", "block_size", "labels", "changes", "received_ns", "device_created_ns", "clock_skew_ns")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_NS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    number: int
    parent: int
    created_ns: int
    author: str
    device: str
    message: str
    manifest_digest: bytes
    kind: LayerKind
    logical_bytes: int
    restored_from: int
    block_size: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    changes: _containers.RepeatedCompositeFieldContainer[ClassChanges]
    received_ns: int
    device_created_ns: int
    clock_skew_ns: int
    def __init__(self, layer: _Optional[str] = ..., number: _Optional[int] = ..., parent: _Optional[int] = ..., created_ns: _Optional[int] = ..., author: _Optional[str] = ..., device: _Optional[str] = ..., message: _Optional[str] = ..., manifest_digest: _Optional[bytes] = ..., kind: _Optional[_Union[LayerKind, str]] = ..., logical_bytes: _Optional[int] = ..., restored_from: _Optional[int] = ..., block_size: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., changes: _Optional[_Iterable[_Union[ClassChanges, _Mapping]]] = ..., received_ns: _Optional[int] = ..., device_created_ns: _Optional[int] = ..., clock_skew_ns: _Optional[int] = ...) -> None: ...

class ClassChanges(_message.Message):
    __slots__ = ("file_class", "added", "changed", "removed")
    FILE_CLASS_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    file_class: str
    added: int
    changed: int
    removed: int
    def __init__(self, file_class: _Optional[str] = ..., added: _Optional[int] = ..., changed: _Optional[int] = ..., removed: _Optional[int] = ...) -> None: ...

class Ref(_message.Message):
    __slots__ = ("layer", "number", "tag")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    layer: str
    number: int
    tag: str
    def __init__(self, layer: _Optional[str] = ..., number: _Optional[int] = ..., tag: _Optional[str] = ...) -> None: ...

class TagMove(_message.Message):
    __slots__ = ("layer", "tag", "number", "previous", "moved_ns", "actor")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    MOVED_NS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    layer: str
    tag: str
    number: int
    previous: int
    moved_ns: int
    actor: str
    def __init__(self, layer: _Optional[str] = ..., tag: _Optional[str] = ..., number: _Optional[int] = ..., previous: _Optional[int] = ..., moved_ns: _Optional[int] = ..., actor: _Optional[str] = ...) -> None: ...
