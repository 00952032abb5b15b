"""The local layer store: one RocksDB database per node (see format.py for its layout)."""
