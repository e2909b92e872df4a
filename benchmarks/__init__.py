"""Measurements of sd3ray (speed, Ray overhead, the GPU report): tools beside the library, not part of it."""
