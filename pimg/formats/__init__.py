"""File formats pimg reads and writes: LoRA (diffusers, kohya/A1111), Textual Inversion, safetensors."""
