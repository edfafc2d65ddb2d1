"""turbofs: lazy-loading container images for fast cold starts.

The index format lives in :mod:`turbofs.core.format`, the OCI plumbing in :mod:`turbofs.core.oci`,
the error hierarchy in :mod:`turbofs.core.errors` and every default in :mod:`turbofs.core.config`.
"""

__version__ = "0.1.0"
