"""pimg's YAML presets, installed as package data (`pimg.methods.preset_path` finds them)."""
