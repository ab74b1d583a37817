"""ConvBERT students cut from the fine-tuned teacher and distilled (Jiang et al., 2020)."""

METHOD = "convbert"
