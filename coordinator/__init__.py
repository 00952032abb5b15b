"""The cachepoint coordinator: catalog, fleet registry and origin of every block (datacenter side)."""
