from cachepoint.v1 import version_pb2 as _version_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "site", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    site: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., site: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_ms",)
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "complete", "load", "report")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    complete: _containers.RepeatedCompositeFieldContainer[_version_pb2.Ref]
    load: int
    report: NodeReport
    def __init__(self, node_id: _Optional[str] = ..., complete: _Optional[_Iterable[_Union[_version_pb2.Ref, _Mapping]]] = ..., load: _Optional[int] = ..., report: _Optional[_Union[NodeReport, _Mapping]] = ...) -> None: ...

class SourceBytes(_message.Message):
    __slots__ = ("source_class", "blocks", "bytes")
    SOURCE_CLASS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    source_class: str
    blocks: int
    bytes: int
    def __init__(self, source_class: _Optional[str] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class SubscriptionReport(_message.Message):
    __slots__ = ("ref", "wanted", "held", "state")
    REF_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    wanted: int
    held: int
    state: str
    def __init__(self, ref: _Optional[str] = ..., wanted: _Optional[int] = ..., held: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("software", "outbox_depth", "sources", "subscriptions")
    SOFTWARE_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    software: str
    outbox_depth: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceBytes]
    subscriptions: _containers.RepeatedCompositeFieldContainer[SubscriptionReport]
    def __init__(self, software: _Optional[str] = ..., outbox_depth: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceBytes, _Mapping]]] = ..., subscriptions: _Optional[_Iterable[_Union[SubscriptionReport, _Mapping]]] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("name", "revoked_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    revoked_at: float
    def __init__(self, name: _Optional[str] = ..., revoked_at: _Optional[float] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("node_id", "users")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    users: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., users: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("trust_view", "revoked", "assignments")
    TRUST_VIEW_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    trust_view: bool
    revoked: _containers.RepeatedCompositeFieldContainer[Revocation]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, trust_view: _Optional[bool] = ..., revoked: _Optional[_Iterable[_Union[Revocation, _Mapping]]] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class FindPeersRequest(_message.Message):
    __slots__ = ("requester_id", "version", "block_ids", "limit", "pulling")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PULLING_FIELD_NUMBER: _ClassVar[int]
    requester_id: str
    version: _version_pb2.Ref
    block_ids: bytes
    limit: int
    pulling: bool
    def __init__(self, requester_id: _Optional[str] = ..., version: _Optional[_Union[_version_pb2.Ref, _Mapping]] = ..., block_ids: _Optional[bytes] = ..., limit: _Optional[int] = ..., pulling: _Optional[bool] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("node", "same_site", "load", "pulling")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SAME_SITE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    PULLING_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    same_site: bool
    load: int
    pulling: bool
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., same_site: _Optional[bool] = ..., load: _Optional[int] = ..., pulling: _Optional[bool] = ...) -> None: ...

class FindPeersResponse(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node", "last_seen_ns", "complete", "load", "healthy", "users")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_NS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    last_seen_ns: int
    complete: _containers.RepeatedCompositeFieldContainer[_version_pb2.Ref]
    load: int
    healthy: bool
    users: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., last_seen_ns: _Optional[int] = ..., complete: _Optional[_Iterable[_Union[_version_pb2.Ref, _Mapping]]] = ..., load: _Optional[int] = ..., healthy: _Optional[bool] = ..., users: _Optional[_Iterable[str]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...
