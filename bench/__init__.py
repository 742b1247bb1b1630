"""Hapax's load benchmark: the gateway beside a bare aiohttp proxy, against one fast upstream.

Run ``python -m bench --help``; see bench/README.md for what the numbers mean.
"""
