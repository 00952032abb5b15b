"""A fleet of real cachepoint daemons on this machine, in network namespaces with shaped WAN links:
the topology (``netns``), the processes (``processes``), one fan-out run measured (``fanout``) and
`make fleet` (``demo``). Used by the tests, the benchmark and `make fleet`; never by cachepoint."""
