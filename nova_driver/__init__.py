"""Nova compute driver and image backend for vmthunder.

Comes with a later issue.
"""
