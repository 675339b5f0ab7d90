"""The resident trainer: the train job started at a run's first train stage and kept for
the whole run (train.between_iterations = keep or offload), so that later iterations load
nothing from disk and pay no process start.

- client.py  the stage's side: `resident_trainer(cfg, run_dir)` starts it (or returns the
             live one), `.train(k, out_dir)` hands it an iteration and waits for the
             snapshot, `release_trainers()` stops it at the end of a flow and at exit.
- server.py  the job's side (`python -m herl.trainer_service.server RUN_DIR CONTROL`,
             under `accelerate launch` for several processes): one herl.training.trainer
             Trainer, stepped once per request.

They talk through files in a control folder (the system's temporary folder on one
machine; inside the run folder, which every machine shares, on several): request-<n>.json from the
stage, reply-<n>.json from rank 0 when snapshot k + 1 is written, `stop` to end. What is
on disk stays the truth: a request names the snapshot k to train from, and a trainer that
does not hold exactly that one (a redone stage, a restarted trainer) loads it, so a crash
anywhere costs at most the one train stage, as with a job per iteration.
"""
