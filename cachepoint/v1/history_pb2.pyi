from cachepoint.v1 import version_pb2 as _version_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TimelineRequest(_message.Message):
    __slots__ = ("user", "from_ns", "to_ns", "layer")
    USER_FIELD_NUMBER: _ClassVar[int]
    FROM_NS_FIELD_NUMBER: _ClassVar[int]
    TO_NS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    user: str
    from_ns: int
    to_ns: int
    layer: str
    def __init__(self, user: _Optional[str] = ..., from_ns: _Optional[int] = ..., to_ns: _Optional[int] = ..., layer: _Optional[str] = ...) -> None: ...

class TimelineEntry(_message.Message):
    __slots__ = ("version", "tags")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    version: _version_pb2.VersionInfo
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[_Union[_version_pb2.VersionInfo, _Mapping]] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class TimelineResponse(_message.Message):
    __slots__ = ("user", "entries")
    USER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    user: str
    entries: _containers.RepeatedCompositeFieldContainer[TimelineEntry]
    def __init__(self, user: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[TimelineEntry, _Mapping]]] = ...) -> None: ...

class FileHistoryRequest(_message.Message):
    __slots__ = ("user", "layer", "path")
    USER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    user: str
    layer: str
    path: str
    def __init__(self, user: _Optional[str] = ..., layer: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class FileVersion(_message.Message):
    __slots__ = ("layer", "number", "created_ns", "device", "author", "path", "type", "mode", "size", "mtime_ns", "sha256", "target", "state")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    layer: str
    number: int
    created_ns: int
    device: str
    author: str
    path: str
    type: int
    mode: int
    size: int
    mtime_ns: int
    sha256: str
    target: str
    state: str
    def __init__(self, layer: _Optional[str] = ..., number: _Optional[int] = ..., created_ns: _Optional[int] = ..., device: _Optional[str] = ..., author: _Optional[str] = ..., path: _Optional[str] = ..., type: _Optional[int] = ..., mode: _Optional[int] = ..., size: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., sha256: _Optional[str] = ..., target: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class FileHistoryResponse(_message.Message):
    __slots__ = ("layer", "path", "versions")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    path: str
    versions: _containers.RepeatedCompositeFieldContainer[FileVersion]
    def __init__(self, layer: _Optional[str] = ..., path: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[FileVersion, _Mapping]]] = ...) -> None: ...

class DiffRequest(_message.Message):
    __slots__ = ("old", "new")
    OLD_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    old: _version_pb2.Ref
    new: _version_pb2.Ref
    def __init__(self, old: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ..., new: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ChangedFile(_message.Message):
    __slots__ = ("path", "ranges", "metadata")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    metadata: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, path: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ..., metadata: _Optional[_Iterable[str]] = ...) -> None: ...

class DiffResponse(_message.Message):
    __slots__ = ("old", "new", "added", "removed", "changed")
    OLD_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    old: str
    new: str
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedCompositeFieldContainer[ChangedFile]
    def __init__(self, old: _Optional[str] = ..., new: _Optional[str] = ..., added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[_Union[ChangedFile, _Mapping]]] = ...) -> None: ...

class GetFileRequest(_message.Message):
    __slots__ = ("user", "layer", "path", "at_ns", "actor")
    USER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    AT_NS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    user: str
    layer: str
    path: str
    at_ns: int
    actor: str
    def __init__(self, user: _Optional[str] = ..., layer: _Optional[str] = ..., path: _Optional[str] = ..., at_ns: _Optional[int] = ..., actor: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("header", "data", "sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header: FileVersion
    data: bytes
    sha256: str
    def __init__(self, header: _Optional[_Union[FileVersion, _Mapping]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class Hold(_message.Message):
    __slots__ = ("user", "reason", "actor", "set_ns")
    USER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    SET_NS_FIELD_NUMBER: _ClassVar[int]
    user: str
    reason: str
    actor: str
    set_ns: int
    def __init__(self, user: _Optional[str] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ..., set_ns: _Optional[int] = ...) -> None: ...

class HoldRequest(_message.Message):
    __slots__ = ("user", "reason", "actor")
    USER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    user: str
    reason: str
    actor: str
    def __init__(self, user: _Optional[str] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("user", "actor")
    USER_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    user: str
    actor: str
    def __init__(self, user: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class ListHoldsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHoldsResponse(_message.Message):
    __slots__ = ("holds",)
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    holds: _containers.RepeatedCompositeFieldContainer[Hold]
    def __init__(self, holds: _Optional[_Iterable[_Union[Hold, _Mapping]]] = ...) -> None: ...

class CollectRequest(_message.Message):
    __slots__ = ("actor", "dry_run")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    actor: str
    dry_run: bool
    def __init__(self, actor: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class CollectResponse(_message.Message):
    __slots__ = ("deleted", "held", "kept", "blocks_removed", "bytes_freed", "dry_run")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    held: _containers.RepeatedScalarFieldContainer[str]
    kept: int
    blocks_removed: int
    bytes_freed: int
    dry_run: bool
    def __init__(self, deleted: _Optional[_Iterable[str]] = ..., held: _Optional[_Iterable[str]] = ..., kept: _Optional[int] = ..., blocks_removed: _Optional[int] = ..., bytes_freed: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("seq", "time_ns", "actor", "action", "subject", "details_json", "prev_hash", "hash", "format")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_ns: int
    actor: str
    action: str
    subject: str
    details_json: str
    prev_hash: str
    hash: str
    format: int
    def __init__(self, seq: _Optional[int] = ..., time_ns: _Optional[int] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., subject: _Optional[str] = ..., details_json: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ..., format: _Optional[int] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("after", "limit", "subject")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    after: int
    limit: int
    subject: str
    def __init__(self, after: _Optional[int] = ..., limit: _Optional[int] = ..., subject: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditVerdict(_message.Message):
    __slots__ = ("ok", "records", "first_broken", "problem", "head_seq", "head_hash")
    OK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BROKEN_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    records: int
    first_broken: int
    problem: str
    head_seq: int
    head_hash: str
    def __init__(self, ok: _Optional[bool] = ..., records: _Optional[int] = ..., first_broken: _Optional[int] = ..., problem: _Optional[str] = ..., head_seq: _Optional[int] = ..., head_hash: _Optional[str] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("user", "from_ns", "to_ns", "actor")
    USER_FIELD_NUMBER: _ClassVar[int]
    FROM_NS_FIELD_NUMBER: _ClassVar[int]
    TO_NS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    user: str
    from_ns: int
    to_ns: int
    actor: str
    def __init__(self, user: _Optional[str] = ..., from_ns: _Optional[int] = ..., to_ns: _Optional[int] = ..., actor: _Optional[str] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...
