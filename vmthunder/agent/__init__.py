"""vmthunder-agent: the per-host daemon.

One asyncio process per compute host. It attaches images (one shared
copy-on-read CacheLayer each), creates and deletes per-VM SnapshotLayers
and serves them to the hypervisor over NBD, and takes orders over a local
JSON/HTTP API on a unix socket:

- service.py  the Agent: images, VMs, the NBD servers, restore on start
- state.py    the state file (images and VMs), written atomically
- api.py      the HTTP routes (aiohttp) over the Agent
- client.py   the client side, used by `vmthunder image|vm|status`
- main.py     the `vmthunder-agent` command (also python -m vmthunder.agent)
"""
