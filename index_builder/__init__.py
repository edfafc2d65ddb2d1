"""Push-time conversion of container images into turbo images (see ``build``)."""

from index_builder.builder import BuildResult, build

__all__ = ["BuildResult", "build"]
