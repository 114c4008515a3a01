"""tokcomp: compare visual-token compression methods for video LLMs on one real model."""

__version__ = "0.1.0"
