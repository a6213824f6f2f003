"""Tests against real OpenStack services (tests/openstack/services.py)."""
