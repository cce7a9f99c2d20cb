"""The pipeline's stages, each a function from artifacts to artifacts; none imports another (see docs/design.md)."""
