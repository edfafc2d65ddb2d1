"""turbofs: lazy-loading container images for fast cold starts.

The index format lives in :mod:`turbofs.format`, the OCI plumbing in :mod:`turbofs.oci`,
the error hierarchy in :mod:`turbofs.errors` and every default in :mod:`turbofs.config`.
"""

__version__ = "0.1.0"
