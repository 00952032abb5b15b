from cachepoint.v1 import version_pb2 as _version_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResolveRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: _version_pb2.Ref
    def __init__(self, ref: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ...) -> None: ...

class ListLayersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerSummary(_message.Message):
    __slots__ = ("name", "kind", "latest", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: _version_pb2.LayerKind
    latest: int
    tags: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[_version_pb2.LayerKind, str]] = ..., latest: _Optional[int] = ..., tags: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListLayersResponse(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerSummary]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerSummary, _Mapping]]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("layer",)
    LAYER_FIELD_NUMBER: _ClassVar[int]
    layer: str
    def __init__(self, layer: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_version_pb2.VersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[_version_pb2.VersionInfo, _Mapping]]] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    def __init__(self, digest: _Optional[bytes] = ...) -> None: ...

class ManifestBlob(_message.Message):
    __slots__ = ("digest", "manifest")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    manifest: bytes
    def __init__(self, digest: _Optional[bytes] = ..., manifest: _Optional[bytes] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("layer", "kind", "manifest", "parent", "author", "device", "message", "tags", "created_ns", "commit_id", "no_parent", "labels", "changes", "sent_ns")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_ID_FIELD_NUMBER: _ClassVar[int]
    NO_PARENT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    SENT_NS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    kind: _version_pb2.LayerKind
    manifest: ManifestBlob
    parent: int
    author: str
    device: str
    message: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    created_ns: int
    commit_id: str
    no_parent: bool
    labels: _containers.RepeatedScalarFieldContainer[str]
    changes: _containers.RepeatedCompositeFieldContainer[_version_pb2.ClassChanges]
    sent_ns: int
    def __init__(self, layer: _Optional[str] = ..., kind: _Optional[_Union[_version_pb2.LayerKind, str]] = ..., manifest: _Optional[_Union[ManifestBlob, _Mapping]] = ..., parent: _Optional[int] = ..., author: _Optional[str] = ..., device: _Optional[str] = ..., message: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., created_ns: _Optional[int] = ..., commit_id: _Optional[str] = ..., no_parent: _Optional[bool] = ..., labels: _Optional[_Iterable[str]] = ..., changes: _Optional[_Iterable[_Union[_version_pb2.ClassChanges, _Mapping]]] = ..., sent_ns: _Optional[int] = ...) -> None: ...

class SetTagRequest(_message.Message):
    __slots__ = ("ref", "tag", "actor")
    REF_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ref: _version_pb2.Ref
    tag: str
    actor: str
    def __init__(self, ref: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ..., tag: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("after", "layers")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    after: int
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, after: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class VersionDeleted(_message.Message):
    __slots__ = ("layer", "number", "deleted_ns", "actor", "reason")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    DELETED_NS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    layer: str
    number: int
    deleted_ns: int
    actor: str
    reason: str
    def __init__(self, layer: _Optional[str] = ..., number: _Optional[int] = ..., deleted_ns: _Optional[int] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CatalogEvent(_message.Message):
    __slots__ = ("position", "version_committed", "tag_moved", "version_deleted")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VERSION_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    TAG_MOVED_FIELD_NUMBER: _ClassVar[int]
    VERSION_DELETED_FIELD_NUMBER: _ClassVar[int]
    position: int
    version_committed: _version_pb2.VersionInfo
    tag_moved: _version_pb2.TagMove
    version_deleted: VersionDeleted
    def __init__(self, position: _Optional[int] = ..., version_committed: _Optional[_Union[_version_pb2.VersionInfo, _Mapping]] = ..., tag_moved: _Optional[_Union[_version_pb2.TagMove, _Mapping]] = ..., version_deleted: _Optional[_Union[VersionDeleted, _Mapping]] = ...) -> None: ...
