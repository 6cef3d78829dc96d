"""Pre-training: config (:mod:`.config`), optimizer and schedule (:mod:`.optim`), atomic checkpoints
(:mod:`.checkpoint`), torchrun/DDP/FSDP (:mod:`.distributed`), scheduled sampling (:mod:`.scheduled_sampling`)
and the loop itself (:mod:`.trainer`)."""
