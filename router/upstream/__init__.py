"""The upstream HTTP/1.1 client: pooled connections, the wire format, decoding, proxies."""
