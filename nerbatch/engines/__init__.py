"""Who runs an annotate job's units (`nerbatch.job` is what a run is):

- `ranks`: one process, or the ranks `accelerate launch` / torchrun started, each with a fixed share
  of the units, coordinating through OUT_DIR (the default, `--engine ranks`);
- `ray_actors`: a pool of Ray actors fed units on demand by one driver (`--engine ray`).

Both write the same output for the same inputs, model and options, and either can finish a run the
other started.
"""
