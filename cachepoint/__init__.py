"""cachepoint: a peer-to-peer CDN for versioned, layered disk images."""

__version__ = "0.1.0"
