"""Encoder disaggregation: what the language and encoder servers agree on, Triton-free.

The language server plans a request before any encoder runs (`plan`: prompt ids with placeholders, each item's
embedding rows and metadata, from the raw bytes' headers and containers), reserves landing space for the rows
(`landing`: a fixed region registered with the encoder servers as Triton shared memory, sliced per item), and sends
each item's raw bytes with its metadata to an encoder server, naming its slice as the output. The encoder server's
media step (`item_encoding`) checks the metadata against the bytes it decodes; its Triton writes the rows into the
slice. `metadata` is the versioned contract both ends check (docs/ARCHITECTURE.md "Encoder disaggregation").
"""
