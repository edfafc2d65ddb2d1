"""The turbofs registry."""
