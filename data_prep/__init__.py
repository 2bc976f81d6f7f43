"""Offline data tools: `python -m data_prep.prepare` (text -> tokenizer + token shards) and
`python -m data_prep.validate DIR` (the loader's start-up checks, run ahead of training). See docs/DATA.md."""
