from cachepoint.v1 import catalog_pb2 as _catalog_pb2
from cachepoint.v1 import version_pb2 as _version_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SourceCounters(_message.Message):
    __slots__ = ("source_class", "blocks", "bytes", "failures", "corrupt")
    SOURCE_CLASS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    source_class: str
    blocks: int
    bytes: int
    failures: int
    corrupt: int
    def __init__(self, source_class: _Optional[str] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ..., failures: _Optional[int] = ..., corrupt: _Optional[int] = ...) -> None: ...

class Subscription(_message.Message):
    __slots__ = ("ref", "wanted", "held", "state", "last_error")
    REF_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    ref: str
    wanted: int
    held: int
    state: str
    last_error: str
    def __init__(self, ref: _Optional[str] = ..., wanted: _Optional[int] = ..., held: _Optional[int] = ..., state: _Optional[str] = ..., last_error: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "site", "address", "coordinator", "coordinator_connected", "subscriptions", "versions", "outbox_depth", "peers_known", "sources", "catalog_position", "scrub_json", "space")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PEERS_KNOWN_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    CATALOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    SCRUB_JSON_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    site: str
    address: str
    coordinator: str
    coordinator_connected: bool
    subscriptions: _containers.RepeatedCompositeFieldContainer[Subscription]
    versions: _containers.RepeatedCompositeFieldContainer[_version_pb2.VersionInfo]
    outbox_depth: int
    peers_known: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceCounters]
    catalog_position: int
    scrub_json: str
    space: DiskSpace
    def __init__(self, node_id: _Optional[str] = ..., site: _Optional[str] = ..., address: _Optional[str] = ..., coordinator: _Optional[str] = ..., coordinator_connected: _Optional[bool] = ..., subscriptions: _Optional[_Iterable[_Union[Subscription, _Mapping]]] = ..., versions: _Optional[_Iterable[_Union[_version_pb2.VersionInfo, _Mapping]]] = ..., outbox_depth: _Optional[int] = ..., peers_known: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceCounters, _Mapping]]] = ..., catalog_position: _Optional[int] = ..., scrub_json: _Optional[str] = ..., space: _Optional[_Union[DiskSpace, _Mapping]] = ...) -> None: ...

class DiskSpace(_message.Message):
    __slots__ = ("available_bytes", "total_bytes", "free_bytes", "min_free", "min_free_bytes", "pulls_paused", "reserve_bytes", "reserve_target_bytes")
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_FREE_FIELD_NUMBER: _ClassVar[int]
    MIN_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PULLS_PAUSED_FIELD_NUMBER: _ClassVar[int]
    RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVE_TARGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    available_bytes: int
    total_bytes: int
    free_bytes: int
    min_free: str
    min_free_bytes: int
    pulls_paused: bool
    reserve_bytes: int
    reserve_target_bytes: int
    def __init__(self, available_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., min_free: _Optional[str] = ..., min_free_bytes: _Optional[int] = ..., pulls_paused: _Optional[bool] = ..., reserve_bytes: _Optional[int] = ..., reserve_target_bytes: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: _version_pb2.Ref
    def __init__(self, ref: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ...) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("blocks_total", "blocks_done", "bytes_done", "version", "finished")
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    blocks_total: int
    blocks_done: int
    bytes_done: int
    version: _version_pb2.VersionInfo
    finished: bool
    def __init__(self, blocks_total: _Optional[int] = ..., blocks_done: _Optional[int] = ..., bytes_done: _Optional[int] = ..., version: _Optional[_Union[_version_pb2.VersionInfo, _Mapping]] = ..., finished: _Optional[bool] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("layer", "path", "kind", "message", "tags", "block_size", "author", "allow_same")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SAME_FIELD_NUMBER: _ClassVar[int]
    layer: str
    path: str
    kind: _version_pb2.LayerKind
    message: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    block_size: int
    author: str
    allow_same: bool
    def __init__(self, layer: _Optional[str] = ..., path: _Optional[str] = ..., kind: _Optional[_Union[_version_pb2.LayerKind, str]] = ..., message: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., block_size: _Optional[int] = ..., author: _Optional[str] = ..., allow_same: _Optional[bool] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("version", "result_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    version: _version_pb2.VersionInfo
    result_json: str
    def __init__(self, version: _Optional[_Union[_version_pb2.VersionInfo, _Mapping]] = ..., result_json: _Optional[str] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("image", "user")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    image: str
    user: str
    def __init__(self, image: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("export_name", "nbd", "read_only", "user_layer")
    EXPORT_NAME_FIELD_NUMBER: _ClassVar[int]
    NBD_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    USER_LAYER_FIELD_NUMBER: _ClassVar[int]
    export_name: str
    nbd: _containers.RepeatedScalarFieldContainer[str]
    read_only: bool
    user_layer: str
    def __init__(self, export_name: _Optional[str] = ..., nbd: _Optional[_Iterable[str]] = ..., read_only: _Optional[bool] = ..., user_layer: _Optional[str] = ...) -> None: ...

class DetachRequest(_message.Message):
    __slots__ = ("export_name", "discard")
    EXPORT_NAME_FIELD_NUMBER: _ClassVar[int]
    DISCARD_FIELD_NUMBER: _ClassVar[int]
    export_name: str
    discard: bool
    def __init__(self, export_name: _Optional[str] = ..., discard: _Optional[bool] = ...) -> None: ...

class DetachResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("export_name", "message", "author")
    EXPORT_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    export_name: str
    message: str
    author: str
    def __init__(self, export_name: _Optional[str] = ..., message: _Optional[str] = ..., author: _Optional[str] = ...) -> None: ...

class CreateImageRequest(_message.Message):
    __slots__ = ("name", "refs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    name: str
    refs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., refs: _Optional[_Iterable[str]] = ...) -> None: ...

class ImageReply(_message.Message):
    __slots__ = ("name", "refs", "replaced")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    name: str
    refs: _containers.RepeatedScalarFieldContainer[str]
    replaced: str
    def __init__(self, name: _Optional[str] = ..., refs: _Optional[_Iterable[str]] = ..., replaced: _Optional[str] = ...) -> None: ...

class RebaseRequest(_message.Message):
    __slots__ = ("image", "to")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    image: str
    to: _version_pb2.Ref
    def __init__(self, image: _Optional[str] = ..., to: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("image", "user", "to", "message", "author")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    image: str
    user: str
    to: _version_pb2.Ref
    message: str
    author: str
    def __init__(self, image: _Optional[str] = ..., user: _Optional[str] = ..., to: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ..., message: _Optional[str] = ..., author: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("layer", "to", "message", "author")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    layer: str
    to: _version_pb2.Ref
    message: str
    author: str
    def __init__(self, layer: _Optional[str] = ..., to: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ..., message: _Optional[str] = ..., author: _Optional[str] = ...) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("result_json",)
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    result_json: str
    def __init__(self, result_json: _Optional[str] = ...) -> None: ...

class ScrubRequest(_message.Message):
    __slots__ = ("rate",)
    RATE_FIELD_NUMBER: _ClassVar[int]
    rate: str
    def __init__(self, rate: _Optional[str] = ...) -> None: ...

class ScrubProgress(_message.Message):
    __slots__ = ("blocks_done", "blocks_total", "bytes_done", "finished", "result_json")
    BLOCKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    blocks_done: int
    blocks_total: int
    bytes_done: int
    finished: bool
    result_json: str
    def __init__(self, blocks_done: _Optional[int] = ..., blocks_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., finished: _Optional[bool] = ..., result_json: _Optional[str] = ...) -> None: ...

class CaptureRequest(_message.Message):
    __slots__ = ("layer", "path", "message", "author", "force", "block_size")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    layer: str
    path: str
    message: str
    author: str
    force: bool
    block_size: int
    def __init__(self, layer: _Optional[str] = ..., path: _Optional[str] = ..., message: _Optional[str] = ..., author: _Optional[str] = ..., force: _Optional[bool] = ..., block_size: _Optional[int] = ...) -> None: ...

class CaptureResponse(_message.Message):
    __slots__ = ("result_json",)
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    result_json: str
    def __init__(self, result_json: _Optional[str] = ...) -> None: ...
