"""Optional patching of third-party models (timm, transformers, open_clip). Nothing in mmfast
imports this package; users do."""
