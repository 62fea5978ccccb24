"""Encoder disaggregation: what the language and encoder servers agree on, Triton-free.

The language server plans a request before any encoder runs (`plan`: prompt ids with placeholders, each item's
embedding rows and metadata, from the raw bytes' headers and containers), reserves landing space for the rows
(`landing`: a fixed region of shared memory, sliced per item), and sends each item's raw bytes with its metadata to
an encoder server, naming its slice (`direct_write`). The encoder server's media step (`item_encoding`) checks the
metadata against the bytes it decodes; its mimo_encoder writes the rows into the slice through a mapping of the
region it keeps (`handoff`: or a NIXL WRITE, or the rows in the response). `metadata` is the versioned contract both ends check (docs/ARCHITECTURE.md "Encoder disaggregation").
"""
