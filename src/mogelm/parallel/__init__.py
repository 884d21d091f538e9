"""Expert parallel + data parallel, applied to a model from outside (the model never imports
torch.distributed). See DESIGN.md §4."""
