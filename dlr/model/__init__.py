"""The model: LLaMA sizes, building a full / low-rank / DLR model, counting its parameters and FLOPs."""
