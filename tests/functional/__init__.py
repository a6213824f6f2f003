"""Functional tests: real tgtd, qemu, nbdkit, network-namespace hosts."""
