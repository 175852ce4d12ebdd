"""Reading and converting pretrained weights (torch checkpoints, safetensors) without torch."""
