"""Training methods (DreamBooth, LoRA, Textual Inversion, the toy base model) on one shared loop."""
