"""Corpora -> token shards (:mod:`.prepare`), the shard format (:mod:`.shards`) and the training loader
(:mod:`.loader`)."""
