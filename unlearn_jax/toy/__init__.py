"""A toy text-to-video world (procedural videos, a detector, a small trained CogVideoX) where
concept erasure can be measured on a CPU."""
