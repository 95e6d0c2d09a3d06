"""Dataset formats -> token ids + loss masks: text corpora (`prepare.py`), chat/instruction data (`instruct.py`),
and the resumable batch sources the training loop reads (`loader.py`)."""
