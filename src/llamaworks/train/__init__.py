"""One training loop for every recipe (pretrain, full SFT, LoRA/QLoRA, DPO): see `train/loop.py`."""
