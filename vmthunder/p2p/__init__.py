"""Peer-to-peer chunk fetching.

:class:`~vmthunder.p2p.volume.ImageVolume` is what a host's cache of an
image reads from (origin and peers behind one read interface, every chunk
checked against the manifest); :class:`~vmthunder.p2p.export.PeerExport`
re-exports that cache read-only to the other hosts.
"""
