"""vmthunder: boot many VMs from one image without copying it first.

A layered block stack per image and host: a shared copy-on-read cache over
the origin (and peers), a copy-on-write snapshot per VM, served over NBD.
See docs/design.md.
"""
