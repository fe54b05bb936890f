"""Bulk backfill client: a manifest of images in, two float32 matrices (CLS, MEAN) out."""
