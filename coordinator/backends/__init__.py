"""Where the coordinator keeps its state: embedded (one RocksDB store in DATA, the default) or shared
(the catalog in PostgreSQL, blocks in a directory every replica mounts), see docs/scale-out.md."""
