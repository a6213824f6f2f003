"""Tests of vmthunder."""
