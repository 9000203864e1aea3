"""TIGER-FG model: ViT and text encoders, text-guided pooling, the two towers."""
