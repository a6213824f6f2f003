"""NBD protocol (sans-IO) plus asyncio server and client."""
