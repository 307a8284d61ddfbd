"""pimg: personalized text-to-image generation on one shared diffusion pipeline."""

__version__ = "0.1.0"
