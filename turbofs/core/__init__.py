"""The core every other part of turbofs builds on: the index format, the chunk codec, OCI
types and layouts, layer and tar reading, the registry client, configuration and errors.

Nothing here imports the builder, the registry server, the node or the command layer
(``tests/test_layering.py`` checks it); docs/architecture.md draws the whole house.
"""
