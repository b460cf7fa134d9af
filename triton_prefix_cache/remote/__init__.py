"""The remote tier: a distributed KV store (Mooncake Store) under the host tier, shared by engines.

`url` parses the config key `remote`; `keys` builds the store's keys and the values' headers;
`store` is the client (`RemoteStore`); `local` starts a master and a store service on loopback.
Nothing here imports the Mooncake client until a store is connected, so the config can be
validated on machines without it.
"""
