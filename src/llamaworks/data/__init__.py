"""Dataset formats -> token ids + loss masks: text corpora (`prepare.py`), chat/instruction data (`instruct.py`),
KakaoTalk exports (`kakaotalk.py`), personal-data scrubbing (`privacy.py`), encodings (`textfile.py`), the
pre-training report (`inspect.py`), and the resumable batch sources the training loop reads (`loader.py`)."""
