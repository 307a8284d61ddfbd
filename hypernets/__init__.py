"""Hypernetworks that predict LoRA weights from subject images (HyperDreamBooth family)."""
