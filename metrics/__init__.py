"""Personalization metrics: CLIP-I, CLIP-T, DINO, face identity, and the DreamBench protocol."""
